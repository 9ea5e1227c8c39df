"""The input processor: a prompt and a request's options in, one `EngineRequest` out.

Every check of what a request asks of the engine lives here, once: the token-id ranges (prompt,
logit_bias, stop_token_ids), the context length, n against the sequence cap, the session rules,
and the StreamingLLM policy a request's `attention_sinks` / `attention_window` resolve to. The
server calls it (off the event loop: encoding a long prompt is work) before it hands the request
to the engine thread; offline `Engine.add_request` calls it too. It reads only settings fixed at
startup and the tokenizer, so any thread may use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.sampling_params import SamplingParams, SamplingParamsError
from model.tokenizers.tokenizer import Tokenizer
from scheduler.engine_request import EngineRequest
from scheduler.sink_policy import SinkPolicy


class PromptTooLongError(ValueError):
    """The prompt plus max_tokens does not fit the model's context."""


@dataclass(frozen=True)
class InputLimits:
    """What the engine was built with that bounds a request."""

    vocab_size: int
    max_model_len: int
    max_num_seqs: int
    num_kv_blocks: int
    block_size: int
    attention_sinks: int  # the engine's StreamingLLM default
    attention_window: int | None  # None or 0: dense by default


def resolve_sink_policy(attention_sinks: int, attention_window: int | None, block_size: int,
                        max_model_len: int) -> SinkPolicy | None:
    """The StreamingLLM policy of sinks + window; a window of 0 (or none) means dense attention.
    ValueError if it cannot be run."""
    if not attention_window:
        return None
    policy = SinkPolicy(attention_sinks, attention_window, block_size)
    if policy.capacity > max_model_len:
        raise ValueError(f"attention sinks + window ({policy.capacity}) must not exceed the context "
                         f"({max_model_len} tokens)")
    return policy


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, limits: InputLimits):
        self.tokenizer = tokenizer
        self.limits = limits

    def sink_policy(self, attention_sinks: int | None = None, attention_window: int | None = None
                    ) -> SinkPolicy | None:
        """The StreamingLLM policy for a request's options; None takes the engine's setting."""
        limits = self.limits
        return resolve_sink_policy(limits.attention_sinks if attention_sinks is None else attention_sinks,
                                   limits.attention_window if attention_window is None else attention_window,
                                   limits.block_size, limits.max_model_len)

    def check_prompt(self, token_ids: list[int], params: SamplingParams, policy: SinkPolicy | None) -> None:
        """Raise ValueError if the request cannot be served; a windowed one has no length limit."""
        limits = self.limits
        if not token_ids:
            raise ValueError("the prompt is empty")
        if params.n > limits.max_num_seqs:
            raise ValueError(f"n={params.n} is more than max_num_seqs={limits.max_num_seqs}")
        vocab = limits.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(t >= vocab for t, _ in params.logit_bias):
            raise SamplingParamsError("logit_bias", f"logit_bias token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise SamplingParamsError("stop_token_ids", f"stop_token_ids must be in [0, {vocab})")
        if policy is not None:
            if policy.capacity_blocks() > limits.num_kv_blocks:
                raise ValueError("the KV pool cannot hold one sequence under this sink policy")
            return
        max_tokens = params.max_tokens or 0
        if len(token_ids) + max_tokens > limits.max_model_len or len(token_ids) >= limits.max_model_len:
            raise PromptTooLongError(
                f"This model's maximum context length is {limits.max_model_len} tokens. However, you "
                f"requested {len(token_ids) + max_tokens} tokens ({len(token_ids)} in the prompt, "
                f"{max_tokens} in the completion). Please reduce the length of the prompt or completion."
            )

    def process(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                attention_sinks: int | None = None, attention_window: int | None = None,
                session_id: str | None = None, deadline: float | None = None, cache_salt: str | None = None,
                tenant: str | None = None, compiled_grammar: object | None = None,
                sink_policy: SinkPolicy | None | bool = False) -> EngineRequest:
        """The EngineRequest for a prompt (text or token ids); ValueError for bad input.

        `attention_sinks` / `attention_window` override the engine's StreamingLLM setting, unless
        `sink_policy` is given: a policy `self.sink_policy` resolved already (None: dense);
        `session_id` keeps the request's cache for the session's next request (sessions.py);
        `cache_salt` lets it share prefix-cache blocks only with requests of the same salt;
        `tenant` (an API key's id) is whose share of the idle sessions' memory its session
        counts in; `compiled_grammar` is `params.grammar` compiled already; at `deadline`
        (time.monotonic()) the request ends with finish reason "timeout".
        """
        if session_id is not None and params.n != 1:
            raise ValueError("a session request must have n = 1")
        if session_id is not None and params.prompt_logprobs is not None:
            raise ValueError("a session request cannot ask for prompt logprobs")
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        policy = self.sink_policy(attention_sinks, attention_window) if sink_policy is False else sink_policy
        self.check_prompt(token_ids, params, policy)
        return EngineRequest(request_id, token_ids, params, policy, session_id, cache_salt, tenant, deadline,
                             compiled_grammar)
