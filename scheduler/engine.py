"""The engine: schedule -> run the model -> sample -> update, one step at a time.

`Engine.step()` is what the server's engine thread calls in a loop; `Engine.generate()` is the
offline API for scripts. This is the one place where the scheduler meets the model.

Fault isolation: an exception while one request's output is processed fails that request
alone (finish reason "error"). An exception in the batched part of a step (inputs, model,
sampler) cannot name its request, so the step's requests run again one at a time (each alone
until it samples a token, at most MAX_SOLO_STEPS steps): one that fails alone is failed, the
others go back to batching. Their caches stay: the failed step committed nothing, and its
slots are rewritten by the retry (a request whose step also copied a shared block, or whose
n completions forked in it, is set back further, see `_isolate`). A failure alone is followed
by the runner's probe on its scratch blocks (a short prefill and a decode, `ModelRunner.probe`):
if it fails too, the engine itself is broken and `step()` raises. A request in MAX_FAULTS rounds that found no
culprit (the fault needs a batch) is failed.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

from model.layers.attention_backend import resolve_backend
from model.execution.host_kv import HostKVPool
from model.execution.kv_sizing import resolve_device, resolve_dtype, size_kv_pool
from model.quantization.auto import resolve_quantization
from model.checkpoints.loader import load_model, model_config
from model.checkpoints.model_path import resolve_model_path
from model.execution.runner import ModelInput, ModelRunner, PromptLogprobRequest
from model.execution.sampler import SamplerOutput, SamplingRow
from model.sampling_params import SamplingParams
from model.tokenizers.tokenizer import check_vocab_size
from model.tokenizers.tokenizer_loader import load_tokenizer
from scheduler.block_manager import BlockManager
from scheduler.engine_config import EngineConfig
from scheduler.engine_request import EngineRequest
from scheduler.engine_stats import EngineStats
from scheduler.input_processor import (InputLimits, InputProcessor, PromptTooLongError,  # noqa: F401 (re-exported)
                                       resolve_sink_policy)
from scheduler.output_processor import OutputProcessor, RequestOutput, TokenLogprob
from scheduler.request import FinishReason, Request
from scheduler.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from scheduler.sessions import HostTier
from scheduler.sink_policy import SinkPolicy
from scheduler.structured_output import StructuredOutput


logger = logging.getLogger(__name__)


MAX_FAULTS = 3
MAX_SOLO_STEPS = 4


@dataclass
class Completion:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class GenerationResult:
    """The offline result for one prompt: its n completions."""

    prompt_token_ids: list[int]
    completions: list[Completion] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return self.completions[0].token_ids

    @property
    def text(self) -> str:
        return self.completions[0].text


class _Stages:
    """Startup progress: one log line per stage done, with the seconds it took."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def done(self, message: str, *args) -> None:
        now = time.perf_counter()
        logger.info(message + " (%.1f s)", *args, now - self.last)
        self.last = now


class Engine:
    """A model, its KV pool and a continuous-batching scheduler, built from an EngineConfig."""

    def __init__(self, model: str | Path | None = None, device: str = "auto", dtype: str | torch.dtype = "auto",
                 **options):
        """`Engine(model, device, dtype, **options)` builds `EngineConfig(model, device, dtype,
        **options)` (options: its other fields) and the engine from it."""
        self.config = config = EngineConfig(model, device, dtype, **options)
        # Everything that can be wrong with the files is found before any weight is read.
        self.model_path = resolve_model_path(config.model)
        stage = _Stages()
        logger.info("loading %s", self.model_path)
        model_cfg = model_config(self.model_path)
        self.tokenizer = load_tokenizer(self.model_path)
        stage.done("config and tokenizer read: %d layers, hidden size %d, %d tokens", model_cfg.num_hidden_layers,
                   model_cfg.hidden_size, self.tokenizer.vocab_size)
        if config.load_format != "dummy":  # random weights belong to no tokenizer: only padded
            check_vocab_size(self.tokenizer, model_cfg.vocab_size, str(self.model_path))
        self.tokenizer.pad_vocab(model_cfg.vocab_size)
        self.device = resolve_device(config.device)
        requested = None if config.dtype == "auto" else resolve_dtype(config.dtype, self.device)
        self.quantization, self.dtype = resolve_quantization(
            config.quantization, self.model_path, model_cfg, self.device, requested,
            config.quantization_group_size, config.smoothquant_alpha)
        logger.info("reading the weights (%s, %s on %s)...", self.quantization.describe(),
                    str(self.dtype).removeprefix("torch."), self.device)
        self.model = load_model(self.model_path, self.dtype, self.device, config.load_format, config.seed,
                                self.quantization)
        stage.done("weights read%s", " and quantized" if self.quantization.method != "none" else "")
        if config.kv_cache_dtype == "fp8":
            raise ValueError("kv_cache_dtype fp8 is not offered; int8 (a scale per token and head) holds as many "
                             "tokens per GiB on every device")
        if config.kv_cache_dtype not in ("auto", "int8"):
            raise ValueError(f"kv_cache_dtype {config.kv_cache_dtype!r} is not one of auto, int8")
        if config.kv_cache_dtype == "int8":
            self.model.kv_cache_dtype = torch.int8
        self.attention_backend = resolve_backend(config.attention_backend, self.device, model_cfg.head_dim)
        self.model.set_attention_backend(self.attention_backend)
        self.max_model_len = config.max_model_len or model_cfg.max_position_embeddings
        if self.max_model_len > model_cfg.max_position_embeddings:
            logger.warning("max_model_len %d is past the model's context (%d): quality will degrade",
                           self.max_model_len, model_cfg.max_position_embeddings)
        self.block_size = config.block_size
        # A bad default is refused before the pool is sized.
        resolve_sink_policy(config.attention_sinks, config.attention_window, config.block_size, self.max_model_len)
        num_blocks = size_kv_pool(self.model, config.block_size, config.num_kv_blocks, config.kv_cache_memory,
                                  config.gpu_memory_utilization, config.max_num_seqs, config.max_num_batched_tokens,
                                  self.max_model_len)
        self.input_processor = InputProcessor(self.tokenizer, InputLimits(
            model_cfg.vocab_size, self.max_model_len, config.max_num_seqs, num_blocks, config.block_size,
            config.attention_sinks, config.attention_window))
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len),
            self.block_manager, config.session_ttl)
        self.runner = ModelRunner(self.model, num_blocks, config.block_size)
        num_host_blocks = config.session_memory // HostKVPool.bytes_per_block(self.runner.kv_caches)
        if num_host_blocks > 0:
            self.scheduler.sessions.host = HostTier(num_host_blocks, HostKVPool(self.runner.kv_caches,
                                                                               num_host_blocks))
        stage.done("KV pool allocated: %d blocks of %d tokens (%.1f MiB), %d host blocks for idle sessions",
                   num_blocks, config.block_size, sum(k.nbytes + v.nbytes for k, v in self.runner.kv_caches) / 2**20,
                   max(num_host_blocks, 0))
        if self.device.type == "cuda" and self.attention_backend == "triton" and not config.enforce_eager:
            try:
                self.runner.use_decode_graphs(config.max_num_seqs, self.max_model_len)
                stage.done("CUDA graphs captured for decode steps")
            except Exception:  # a driver or triton that cannot capture: run eagerly rather than not at all
                logger.exception("CUDA graph capture failed; decode steps run eagerly")
                self.runner.decode_graphs = None
                torch.cuda.synchronize(self.device)
        # Stop ids: the model's (generation_config.json or the GGUF), the tokenizer's EOS and the
        # end-of-turn tokens it knows of, as vLLM and llama.cpp stop.
        tokenizer_stops = (self.tokenizer.eos_token_id, *self.tokenizer.end_of_generation_ids)
        self.stop_token_ids = tuple(dict.fromkeys(model_cfg.eos_token_ids + tuple(i for i in tokenizer_stops
                                                                               if i is not None)))
        self.output_processor = OutputProcessor(self.tokenizer, self.stop_token_ids, self.max_model_len)
        self.structured_output = StructuredOutput(
            self.tokenizer, model_cfg.vocab_size, self.stop_token_ids,
            max_cached_bytes=config.grammar_cache_memory, mask_timeout=config.grammar_mask_timeout)
        self._groups: dict[str, list[Request]] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._deadlines: list[tuple[float, str]] = []  # heap of (deadline, request id)
        self._suspects: deque[Request] = deque()  # requests of a failed step, to run alone
        self._round: list[Request] = []  # the requests of the failed step being isolated
        self._culprit_found = False  # in this round
        self._solo_request: Request | None = None  # the suspect running alone,
        self._solo_steps = 0  # and its steps so far
        self._pending_failures: list[RequestOutput] = []  # failed between steps, to report
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        return cls(**{f.name: getattr(config, f.name) for f in fields(config)})

    # -- the API the server drives ------------------------------------------------------------

    def sink_policy(self, attention_sinks: int | None = None, attention_window: int | None = None
                    ) -> SinkPolicy | None:
        """InputProcessor.sink_policy: the StreamingLLM policy for a request's options."""
        return self.input_processor.sink_policy(attention_sinks, attention_window)

    def check_prompt(self, token_ids: list[int], params: SamplingParams, policy: SinkPolicy | None) -> None:
        """InputProcessor.check_prompt: ValueError (PromptTooLongError) if it cannot be served."""
        self.input_processor.check_prompt(token_ids, params, policy)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    **options) -> list[int]:
        """Check and queue a request (options: InputProcessor.process's); returns its prompt
        token ids. Raises ValueError for bad input."""
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = self.input_processor.process(request_id, prompt, params, **options)
        self.add(request)
        return request.prompt_token_ids

    def add(self, request: EngineRequest) -> None:
        """Queue a request the input processor built (trusted: nothing is checked again but its
        id and its grammar, which is compiled here unless it came compiled). ValueError if the
        id is in use or the grammar is refused."""
        request_id, params = request.request_id, request.params
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.grammar is not None:
            # GrammarError: a ValueError
            self.structured_output.add(request_id, params.grammar, request.cache_salt, request.compiled_grammar)
        state = Request(request_id, request.prompt_token_ids, params, sink_policy=request.sink_policy,
                        session_id=request.session_id, cache_salt=request.cache_salt, tenant=request.tenant)
        self._groups[request_id] = [state]
        self.output_processor.add(state)
        self.scheduler.add_request(state)
        if request.deadline is not None:
            heapq.heappush(self._deadlines, (request.deadline, request_id))
        self.num_prompt_tokens += len(request.prompt_token_ids)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> list[RequestOutput]:
        """Stop every completion of a request and free their blocks at once."""
        outputs = []
        group = self._groups.pop(request_id, [])
        for request in group:
            if not request.is_finished:
                self.scheduler.finish_request(request, reason)
                outputs.append(self.output_processor.final_output(request))
            self._forget(request)
        if group and not group[0].forked:
            # The n - 1 completions of a prompt that had not forked yet end too: whoever waits
            # for all n gets every one of them.
            parent = group[0]
            outputs += [RequestOutput(request_id=request_id, index=index, new_token_ids=[], text="", finished=True,
                                      finish_reason=reason.value, num_prompt_tokens=parent.num_prompt_tokens)
                        for index in range(1, parent.params.n)]
        return outputs

    def end_session(self, session_id: str) -> bool:
        """Drop a session's cache; False if it did not exist."""
        return self.scheduler.sessions.drop(session_id)

    def served_as(self) -> dict:
        """How the model is served: its quantization, activations' dtype, weight and KV bytes."""
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        weights += sum(layer.nbytes for layer in self.model.quant_layers())
        return {"quantization": self.quantization.describe(), "dtype": str(self.dtype).removeprefix("torch."),
                "kv_cache_dtype": self.config.kv_cache_dtype if self.config.kv_cache_dtype != "auto"
                else str(self.dtype).removeprefix("torch."), "weight_bytes": weights,
                "kv_cache_bytes": sum(k.nbytes + v.nbytes for k, v in self.runner.kv_caches)}

    @property
    def num_sessions(self) -> int:
        return len(self.scheduler.sessions)

    def stats(self) -> EngineStats:
        scheduler, blocks, sessions = self.scheduler, self.block_manager, self.scheduler.sessions
        grammars = self.structured_output
        return EngineStats(
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            num_kv_blocks_used=blocks.num_used_blocks, num_kv_blocks_total=blocks.num_blocks,
            prefix_cache_queries=blocks.prefix_cache_queries, prefix_cache_hits=blocks.prefix_cache_hits,
            num_prompt_tokens=self.num_prompt_tokens, num_generation_tokens=self.num_generation_tokens,
            num_preemptions=scheduler.num_preemptions, num_sink_evictions=scheduler.num_evictions,
            num_sessions=len(scheduler.sessions), num_session_reused_tokens=scheduler.sessions.num_reused_tokens,
            num_sessions_in_host=sessions.num_swapped,
            num_session_host_blocks_used=sessions.host.num_used_blocks if sessions.host else 0,
            num_session_host_blocks_total=sessions.host.num_blocks if sessions.host else 0,
            num_sessions_swapped_out=sessions.num_swapped_out, num_sessions_swapped_in=sessions.num_swapped_in,
            num_grammars_compiled=grammars.num_compiled, num_grammars_cached=len(grammars.cache),
            grammar_cache_bytes=grammars.cache.num_bytes, num_grammar_errors=grammars.num_grammar_errors,
            num_grammar_timeouts=grammars.num_mask_timeouts)

    def expire_sessions(self) -> int:
        return self.scheduler.sessions.expire(time.monotonic())

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self._pending_failures)

    def step(self) -> list[RequestOutput]:
        outputs = self._step()
        if self._suspects:  # drop the ones that ended (failed with their group, aborted, ...)
            self._suspects = deque(r for r in self._suspects if not r.is_finished)
            if not self._suspects:
                self._end_round()
        if self._pending_failures:  # after this step's own outputs: a failure is a request's last word
            outputs, self._pending_failures = outputs + self._pending_failures, []
        return outputs

    def _step(self) -> list[RequestOutput]:
        expired = self._expire_deadlines(time.monotonic())
        batch = self._schedule()
        if not batch.requests:
            return expired
        for child in batch.forked:
            self._groups[child.group_id].append(child)
            self.output_processor.add(child)
            self.structured_output.fork(child.group_id, child.request_id)
        model_input = None
        try:
            model_input = self._model_input(batch)
            output = self.runner.execute(model_input)
        except Exception:
            if model_input is not None and model_input.token_masks is not None:
                model_input.token_masks.settle()  # the matchers are not to be touched while it runs
            logger.exception("a step of %d requests failed: %s", len(batch.requests),
                             ", ".join(dict.fromkeys(r.group_id for r in batch.requests)))
            return expired + self._isolate(batch)
        self.scheduler.update(batch)
        outputs = []
        for pl_req, pl in zip(model_input.prompt_logprobs, output.prompt_logprobs):
            request = batch.requests[pl_req.seq_index]
            position = request.num_computed_tokens - batch.num_new_tokens[pl_req.seq_index] + 1
            try:
                self.output_processor.add_prompt_logprobs(request, position, [
                    TokenLogprob(t, lp, rank, list(zip(ids, lps)))
                    for t, lp, rank, ids, lps in zip(pl.token_ids, pl.logprobs, pl.ranks, pl.top_token_ids,
                                                     pl.top_logprobs)])
            except Exception:
                outputs += self._fail(request.group_id)
        overran = set(model_input.token_masks.overran) if model_input.token_masks is not None else set()
        outputs = expired + outputs + self._process_samples(batch, output.sampled, overran)
        if self._suspects and batch.requests[0] is self._suspects[0]:
            if self._solo_request is not self._suspects[0]:
                self._solo_request, self._solo_steps = self._suspects[0], 0
            self._solo_steps += 1
            if self._solo_steps >= MAX_SOLO_STEPS or any(r is self._suspects[0] for r, _ in batch.samplers):
                self._clear_first_suspect()  # it ran alone (up to a sampled token): not the culprit
        return outputs

    def fail(self, request_id: str) -> list[RequestOutput]:
        """End every completion of a request with finish reason "error" and free its blocks."""
        return self.abort(request_id, FinishReason.ERROR)

    # -- internals ---------------------------------------------------------------------------

    def _schedule(self) -> ScheduledBatch:
        """The next step: the first suspect alone while there are any, else a normal batch."""
        while self._suspects:
            suspect = self._suspects[0]
            batch = ScheduledBatch() if suspect.is_finished else self.scheduler.schedule_alone(suspect)
            if batch.requests:
                return batch
            self._clear_first_suspect()  # finished, or no room to run it alone: back to batching
        return self.scheduler.schedule()

    def _fail(self, group_id: str) -> list[RequestOutput]:
        logger.exception("request %s failed", group_id)
        return self.fail(group_id)

    def _isolate(self, batch: ScheduledBatch) -> list[RequestOutput]:
        """After a failed step: fail its request if it ran alone, else run its requests one at
        a time. The failed step wrote K/V only into slots it had not committed, which the retry
        rewrites; a request whose block copies (copy-on-write) may not have run is recomputed,
        and completions forked in the step are dropped, to fork again."""
        requests = batch.requests
        if len({r.group_id for r in requests}) == 1:
            self._culprit_found = True
            self.runner.probe(self.tokenizer.bos_token_id or 0)  # raises if the engine itself is broken
            return self.fail(requests[0].group_id)
        for child in batch.forked:
            self.scheduler.unfork(child)
            self._groups[child.group_id].remove(child)
            self._forget(child)
        copied = {dst for _, dst in batch.blocks_to_copy}
        for request in reversed(requests):
            if copied & set(self.block_manager.block_table(request.request_id)):
                self.scheduler.requeue(request)
        self._suspects.extend(requests)
        self._round, self._culprit_found = list(requests), False
        return []

    def _clear_first_suspect(self) -> None:
        self._suspects.popleft()
        if not self._suspects:
            self._end_round()

    def _end_round(self) -> None:
        """Every suspect has run alone. If none failed, the fault needs a batch: count it, so
        that such a fault cannot be retried forever."""
        if not self._culprit_found:
            for request in self._round:
                if not request.is_finished:
                    request.num_faults += 1
                    if request.num_faults >= MAX_FAULTS:
                        logger.error("request %s was in %d failed steps without a culprit", request.group_id,
                                     request.num_faults)
                        self._pending_failures += self.fail(request.group_id)
        self._round = []

    def _expire_deadlines(self, now: float) -> list[RequestOutput]:
        outputs = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, request_id = heapq.heappop(self._deadlines)
            outputs += self.abort(request_id, FinishReason.TIMEOUT)  # nothing if it already ended
        return outputs

    def _model_input(self, batch: ScheduledBatch) -> ModelInput:
        token_ids, context_lens, tables, prompt_lps = [], [], [], []
        sink_lens, sink_gaps, num_evicted = [], [], []
        for i, (request, num_new) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            start = request.num_computed_tokens
            token_ids.extend(request.token_ids[start:start + num_new])
            context_lens.append(request.num_kept_tokens + num_new)
            tables.append(self.block_manager.block_table(request.request_id))
            sink_lens.append(request.sink_policy.num_sinks if request.sink_policy else 0)
            sink_gaps.append(request.sink_gap)
            num_evicted.append(request.num_evicted_tokens)
            wanted = request.params.prompt_logprobs
            if wanted is not None and request.num_output_tokens == 0:
                # Chunk token j predicts prompt token start + j + 1.
                targets = request.prompt_token_ids[start + 1:start + num_new + 1]
                if targets:
                    prompt_lps.append(PromptLogprobRequest(i, targets, wanted))
        rows = [self._sampling_row(request) for request, _ in batch.samplers]
        return ModelInput(
            token_ids=token_ids, query_lens=list(batch.num_new_tokens), context_lens=context_lens,
            block_tables=tables, sample_seq_indices=[row for _, row in batch.samplers], sampling_rows=rows,
            banned_token_ids=[self.output_processor.banned_token_ids(r) for r, _ in batch.samplers],
            token_masks=self.structured_output.start_masks([r.request_id for r, _ in batch.samplers]),
            blocks_to_copy=batch.blocks_to_copy, prompt_logprobs=prompt_lps,
            sink_lens=sink_lens, sink_gaps=sink_gaps, num_evicted=num_evicted,
        )

    def _sampling_row(self, request: Request) -> SamplingRow:
        params = request.params
        generator = None
        if params.seed is not None:
            generator = self._generators.get(request.request_id)
            if generator is None:
                generator = torch.Generator(self.device).manual_seed(params.seed + request.index)
                self._generators[request.request_id] = generator
        # Token histories are copied only for the penalties that read them: a long generation
        # must not pay O(length) per step.
        uses_history = params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0
        if not uses_history:
            return SamplingRow(params, generator)
        return SamplingRow(params, generator, request.prompt_token_ids, request.output_token_ids)

    def _process_samples(self, batch: ScheduledBatch, sampled: SamplerOutput | None,
                         overran: set[int] = frozenset()) -> list[RequestOutput]:
        """Each sampled token into its request; `overran`: the sampling rows whose grammar mask
        took longer than the budget (their requests end after this token)."""
        if sampled is None:
            return []
        token_ids = sampled.token_ids.tolist()
        logprobs = None
        if sampled.logprobs is not None:
            logprobs = list(zip(sampled.logprobs.tolist(), sampled.ranks.tolist(),
                                sampled.top_token_ids.tolist(), sampled.top_logprobs.tolist()))
        outputs = []
        for row, ((request, _), token_id) in enumerate(zip(batch.samplers, token_ids)):
            if request.is_finished:
                continue
            entry = None
            wanted = request.params.logprobs
            try:
                if wanted is not None and logprobs is not None:
                    lp, rank, top_ids, top_lps = logprobs[row]
                    entry = TokenLogprob(token_id, lp, rank, list(zip(top_ids[:wanted], top_lps[:wanted])))
                grammar = self.structured_output.accept(request.request_id, token_id, row in overran)
                out = self.output_processor.process_token(request, token_id, entry, grammar)
            except Exception:  # this request's text or stop check failed: it alone ends
                outputs += self._fail(request.group_id)
                continue
            self.num_generation_tokens += len(out.new_token_ids)
            if out.finished:
                self.scheduler.finish_request(request, request.finish_reason, request.stop_reason)
                self._forget(request)
            outputs.append(out)
        for group_id in {out.request_id for out in outputs if out.finished}:
            group = self._groups.get(group_id, [])
            if all(r.is_finished for r in group):
                self._groups.pop(group_id, None)
        return outputs

    def _forget(self, request: Request) -> None:
        self.output_processor.remove(request)
        self.structured_output.remove(request.request_id)
        self._generators.pop(request.request_id, None)

    # -- offline API -------------------------------------------------------------------------

    def generate(self, prompts: str | list[str] | list[list[int]], params: SamplingParams | None = None,
                 use_tqdm: bool = True) -> list[GenerationResult]:
        """Run prompts (text or token ids) to completion; one result per prompt, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        ids = [f"generate-{next(_offline_ids)}" for _ in prompts]
        results = {}
        for request_id, prompt in zip(ids, prompts):
            token_ids = self.add_request(request_id, prompt, params)
            results[request_id] = GenerationResult(token_ids, [
                Completion(i, [], "", None, [] if params.logprobs is not None else None) for i in range(params.n)])
        total = len(prompts) * params.n
        with tqdm(total=total, desc="generate", unit="seq", disable=not use_tqdm) as bar:
            while self.has_unfinished_requests():
                for out in self.step():
                    completion = results[out.request_id].completions[out.index]
                    completion.token_ids.extend(out.new_token_ids)
                    completion.text += out.text
                    if out.logprobs:
                        completion.logprobs.extend(out.logprobs)
                    if out.finished:
                        completion.finish_reason = out.finish_reason
                        bar.update(1)
        return [results[request_id] for request_id in ids]


_offline_ids = itertools.count()
