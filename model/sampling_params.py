"""Per-request sampling and stopping options (plain data, shared by the server, scheduler and sampler)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_LOGPROBS = 20
# Stop strings: OpenAI takes at most 4, vLLM any number. 64 strings of up to 256 characters is
# far more than chat markers and code delimiters need, and bounds what a request can cost: the
# stop-string automaton has at most 64 * 256 nodes (about 4 MB, built in some 30 ms), and at most
# 256 characters of output are held back while they could begin a stop string.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256


class SamplingParamsError(ValueError):
    """An out-of-range option; `param` names it (as the OpenAI API spells it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """How to sample a request's tokens and when to stop.

    `temperature` 0 (below 1e-5) is greedy. `top_k=None` keeps every token; `max_tokens=None` generates
    until a stop condition or the context is full. `logprobs=k` returns each sampled token's
    logprob and the k most likely alternatives (0: the sampled token's only);
    `prompt_logprobs=k` does the same for the prompt tokens.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    # With max_tokens None: at most this many output tokens, or up to the context, whichever
    # comes first (never below min_tokens). The server's cap for requests that set none.
    default_max_tokens: int | None = None
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # (token id, bias) pairs added to the logits before sampling (OpenAI's logit_bias; a dict is
    # accepted and stored sorted, so the params stay hashable)
    logit_bias: tuple[tuple[int, float], ...] = ()
    # An llguidance grammar the output must follow (scheduler/structured_output.py); None: free.
    grammar: str | None = None

    def __post_init__(self):
        # Lists are accepted for convenience and stored as tuples so the params stay hashable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else (self.logit_bias or ())
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in bias)))
        # Checked apart from the list below, whose message would repeat the whole stop list.
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingParamsError("stop", f"stop may hold at most {MAX_STOP_STRINGS} strings, "
                                              f"got {len(self.stop)}")
        longest = max((len(s) for s in self.stop if isinstance(s, str)), default=0)
        if longest > MAX_STOP_STRING_CHARS:
            raise SamplingParamsError("stop", f"stop strings may be at most {MAX_STOP_STRING_CHARS} "
                                              f"characters long, got one of {longest}")
        checks = [
            ("n", self.n >= 1, "must be at least 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k is None or self.top_k >= 1, "must be at least 1 (or null for all tokens)"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "must be in (0, 10]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 0, "must be at least 0"),
            ("default_max_tokens", self.default_max_tokens is None or self.default_max_tokens >= 1,
             "must be at least 1"),
            ("min_tokens", self.min_tokens >= 0, "must be at least 0"),
            ("min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens,
             "must not exceed max_tokens"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"must be in [0, {MAX_LOGPROBS}]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"must be in [0, {MAX_LOGPROBS}]"),
            # torch.Generator.manual_seed takes a signed or unsigned 64-bit integer.
            ("logit_bias", all(-100.0 <= b <= 100.0 and t >= 0 for t, b in self.logit_bias),
             "must map token ids to biases in [-100, 100]"),
            ("seed", self.seed is None or -2**63 <= self.seed < 2**64, "must be a 64-bit integer"),
        ]
        for param, ok, message in checks:
            if not ok:
                raise SamplingParamsError(param, f"{param} {message}, got {getattr(self, param)!r}")

    @property
    def greedy(self) -> bool:
        # Below this, dividing float32 logits by the temperature overflows; such rows are argmax.
        return self.temperature < 1e-5
