"""The engine: schedule -> execute -> update, one step at a time.

`Engine.step()` is what the server's engine thread calls in a loop; `Engine.generate()` is the
offline API for scripts (offline.py). The scheduler decides each step's work (scheduler.py) and
writes it out as plain data; the executor runs the model on it (executor.py); the update records
the computed tokens and turns the sampled ones into outputs (output_processor.py). Around the
step: deadlines (deadlines.py), a request's n completions (request_groups.py) and fault isolation
(fault_isolation.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import fields
from pathlib import Path

import torch

from model.checkpoints.loader import model_config
from model.checkpoints.model_path import resolve_model_path
from model.execution.model_input import GrammarBitmask, ModelOutput
from model.sampling_params import SamplingParams
from model.tokenizers.tokenizer import check_vocab_size
from model.tokenizers.tokenizer_loader import load_tokenizer
from scheduler.block_manager import BlockManager
from scheduler.deadlines import Deadlines
from scheduler.engine_config import EngineConfig
from scheduler.engine_request import EngineRequest
from scheduler.engine_stats import EngineStats, collect_stats
from scheduler.executor import InProcessExecutor
from scheduler.fault_isolation import FaultIsolation
from scheduler.input_processor import (InputLimits, InputProcessor, PromptTooLongError,  # noqa: F401 (re-exported)
                                       resolve_sink_policy)
from scheduler.offline import GenerationResult, generate
from scheduler.output_processor import OutputProcessor, RequestOutput, TokenLogprob
from scheduler.request import FinishReason, Request
from scheduler.request_groups import RequestGroups
from scheduler.scheduler import Scheduler, SchedulerConfig
from scheduler.scheduler_output import SchedulerOutput
from scheduler.sessions import HostTier
from scheduler.sink_policy import SinkPolicy
from scheduler.startup_stages import StartupStages
from scheduler.structured_output import StructuredOutput

logger = logging.getLogger(__name__)


class Engine:
    """A model, its KV pool and a continuous-batching scheduler, built from an EngineConfig."""

    def __init__(self, model: str | Path | None = None, device: str = "auto", dtype: str | torch.dtype = "auto",
                 **options):
        """`Engine(model, device, dtype, **options)` builds `EngineConfig(model, device, dtype,
        **options)` (options: its other fields) and the engine from it."""
        self.config = config = EngineConfig(model, device, dtype, **options)
        # Everything that can be wrong with the files is found before any weight is read.
        self.model_path = resolve_model_path(config.model)
        stages = StartupStages()
        logger.info("loading %s", self.model_path)
        model_cfg = model_config(self.model_path)
        self.tokenizer = load_tokenizer(self.model_path)
        stages.done("config and tokenizer read: %d layers, hidden size %d, %d tokens", model_cfg.num_hidden_layers,
                    model_cfg.hidden_size, self.tokenizer.vocab_size)
        if config.load_format != "dummy":  # random weights belong to no tokenizer: only padded
            check_vocab_size(self.tokenizer, model_cfg.vocab_size, str(self.model_path))
        self.tokenizer.pad_vocab(model_cfg.vocab_size)
        self.max_model_len = config.max_model_len or model_cfg.max_position_embeddings
        if self.max_model_len > model_cfg.max_position_embeddings:
            logger.warning("max_model_len %d is past the model's context (%d): quality will degrade",
                           self.max_model_len, model_cfg.max_position_embeddings)
        self.block_size = config.block_size
        # A bad default is refused before the pool is sized.
        resolve_sink_policy(config.attention_sinks, config.attention_window, config.block_size, self.max_model_len)
        # Stop ids: the model's (generation_config.json or the GGUF), the tokenizer's EOS and the
        # end-of-turn tokens it knows of, as vLLM and llama.cpp stop.
        tokenizer_stops = (self.tokenizer.eos_token_id, *self.tokenizer.end_of_generation_ids)
        self.stop_token_ids = tuple(dict.fromkeys(model_cfg.eos_token_ids + tuple(i for i in tokenizer_stops
                                                                               if i is not None)))
        self.executor = executor = InProcessExecutor(config, self.model_path, model_cfg, self.max_model_len,
                                                     self.stop_token_ids, stages)
        # The in-process model side, for tests and benchmarks.
        self.runner, self.model = executor.runner, executor.model
        self.device, self.dtype, self.attention_backend = executor.device, executor.dtype, executor.attention_backend
        self.input_processor = InputProcessor(self.tokenizer, InputLimits(
            model_cfg.vocab_size, self.max_model_len, config.max_num_seqs, executor.num_blocks, config.block_size,
            config.attention_sinks, config.attention_window))
        self.block_manager = BlockManager(executor.num_blocks, config.block_size, config.enable_prefix_caching)
        host = HostTier(executor.num_host_blocks, executor) if executor.num_host_blocks else None
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len),
            self.block_manager, config.session_ttl, host)
        self.output_processor = OutputProcessor(self.tokenizer, self.stop_token_ids, self.max_model_len)
        self.structured_output = StructuredOutput(
            self.tokenizer, model_cfg.vocab_size, self.stop_token_ids,
            max_cached_bytes=config.grammar_cache_memory, mask_timeout=config.grammar_mask_timeout)
        self._groups = RequestGroups()
        self.deadlines = Deadlines()
        self.fault_isolation = FaultIsolation(self.scheduler, self.block_manager, self.fail)
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
        self._groups.add(state)
        self.output_processor.add(state)
        self.scheduler.add_request(state)
        if request.deadline is not None:
            self.deadlines.add(request.deadline, request_id)
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

    def fail(self, request_id: str) -> list[RequestOutput]:
        """End every completion of a request with finish reason "error" and free its blocks."""
        return self.abort(request_id, FinishReason.ERROR)

    def end_session(self, session_id: str) -> bool:
        """Drop a session's cache; False if it did not exist."""
        return self.scheduler.sessions.drop(session_id)

    def expire_sessions(self) -> int:
        return self.scheduler.sessions.expire(time.monotonic())

    @property
    def num_sessions(self) -> int:
        return len(self.scheduler.sessions)

    def served_as(self) -> dict:
        """How the model is served: its quantization, activations' dtype, weight and KV bytes."""
        return self.executor.served_as()

    def stats(self) -> EngineStats:
        return collect_stats(self.scheduler, self.structured_output, self.num_prompt_tokens,
                             self.num_generation_tokens)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self.fault_isolation.pending_failures)

    def step(self) -> list[RequestOutput]:
        """Schedule -> execute -> update."""
        outputs = [out for request_id in self.deadlines.expired(time.monotonic())
                   for out in self.abort(request_id, FinishReason.TIMEOUT)]  # nothing if it already ended
        scheduled = self.fault_isolation.schedule()
        if scheduled.requests:
            for child in scheduled.forked:
                self._groups.add_fork(child)
                self.output_processor.add(child)
                self.structured_output.fork(child.group_id, child.request_id)
            executed = self._execute(scheduled)
            if executed is None:
                outputs += self._isolate(scheduled)
            else:
                outputs += self._update(scheduled, *executed)
                self.fault_isolation.step_done(scheduled)
        return outputs + self.fault_isolation.end_step()

    def generate(self, prompts: str | list[str] | list[list[int]], params: SamplingParams | None = None,
                 use_tqdm: bool = True) -> list[GenerationResult]:
        """Run prompts (text or token ids) to completion; one result per prompt, in order."""
        return generate(self, prompts, params, use_tqdm)

    # -- the step's parts --------------------------------------------------------------------

    def _execute(self, scheduled: SchedulerOutput) -> tuple[ModelOutput, set[int]] | None:
        """Run the step on the executor, the grammar masks filled meanwhile (executor.py). Returns
        its output and the sampling rows whose mask overran its time; None if the step raised."""
        masks = None
        try:
            masks = self.structured_output.start_masks([r.request_id for r, _ in scheduled.samplers])
            self.executor.execute_model(scheduled.model_input)
            grammar = None if masks is None else GrammarBitmask(*masks.wait())
            return self.executor.sample_tokens(grammar), set(masks.overran) if masks is not None else set()
        except Exception:
            if masks is not None:
                masks.settle()  # the matchers are not to be touched while it runs
            logger.exception("a step of %d requests failed: %s", len(scheduled.requests),
                             ", ".join(dict.fromkeys(r.group_id for r in scheduled.requests)))
            return None

    def _isolate(self, scheduled: SchedulerOutput) -> list[RequestOutput]:
        """After a failed step: fail its request if it ran alone (once the probe shows the
        engine itself works), else run its requests one at a time (fault_isolation.py)."""
        culprit = self.fault_isolation.culprit(scheduled)
        if culprit is not None:
            self.executor.probe(self.tokenizer.bos_token_id or 0)  # raises if the engine itself is broken
            return self.fail(culprit)
        for child in scheduled.forked:
            self._groups.drop_fork(child)
            self._forget(child)
        self.fault_isolation.retry_alone(scheduled)
        return []

    def _update(self, scheduled: SchedulerOutput, output: ModelOutput, overran: set[int]) -> list[RequestOutput]:
        """Record the computed tokens, then each request's prompt logprobs and sampled token."""
        self.scheduler.update(scheduled)
        outputs = []
        for target, logprobs in zip(scheduled.model_input.prompt_logprobs, output.prompt_logprobs):
            request = scheduled.requests[target.seq_index]
            position = request.num_computed_tokens - scheduled.num_new_tokens[target.seq_index] + 1
            try:
                self.output_processor.add_prompt_logprobs(request, position, logprobs)
            except Exception:
                outputs += self._fail(request.group_id)
        return outputs + self._process_samples(scheduled, output, overran)

    def _process_samples(self, scheduled: SchedulerOutput, output: ModelOutput,
                         overran: set[int]) -> list[RequestOutput]:
        """Each sampled token into its request; `overran`: the sampling rows whose grammar mask
        took longer than the budget (their requests end after this token)."""
        logprobs = output.logprobs
        outputs = []
        for row, ((request, _), token_id) in enumerate(zip(scheduled.samplers, output.sampled_token_ids)):
            if request.is_finished:
                continue
            entry = None
            wanted = request.params.logprobs
            try:
                if wanted is not None and logprobs is not None:
                    top = zip(logprobs.top_token_ids[row][:wanted], logprobs.top_logprobs[row][:wanted])
                    entry = TokenLogprob(token_id, logprobs.logprobs[row], logprobs.ranks[row], list(top))
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
        self._groups.drop_finished({out.request_id for out in outputs if out.finished})
        return outputs

    def _fail(self, group_id: str) -> list[RequestOutput]:
        logger.exception("request %s failed", group_id)
        return self.fail(group_id)

    def _forget(self, request: Request) -> None:
        self.output_processor.remove(request)
        self.structured_output.remove(request.request_id)
