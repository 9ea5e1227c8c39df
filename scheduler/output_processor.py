"""From sampled tokens to what the client sees: stop conditions, text deltas, logprobs.

Per request: an incremental detokenizer, and a text tail held back while it could still be
the beginning of a stop string, so that stop text never reaches the output even when it spans
several tokens. Stop strings are found by an automaton fed each token's new text
(stop_strings.py), at a cost that does not grow with their number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from model.execution.model_input import TokenLogprobs
from scheduler.request import FinishReason, GrammarOutcome, Request
from scheduler.stop_strings import StopStringMatcher, automaton_for

if TYPE_CHECKING:
    from model.tokenizers.tokenizer import Detokenizer, Tokenizer


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]  # the most likely alternatives, most likely first


@dataclass
class RequestOutput:
    """What one completion gained in one step (or its final state, when finished)."""

    request_id: str  # the client's request id (shared by the n completions of one prompt)
    index: int  # which of the n completions
    new_token_ids: list[int]
    text: str  # the text delta
    finished: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None  # for new_token_ids, when asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, when prefill completes
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class _TextState:
    detokenizer: Detokenizer
    stop_matcher: StopStringMatcher | None  # None: the request has no stop strings
    held: str = ""  # decoded text not yet emitted: it may start a stop string
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)


class OutputProcessor:
    """Checks stop conditions after each sampled token and produces RequestOutputs."""

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: tuple[int, ...], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self._states: dict[str, _TextState] = {}

    def add(self, request: Request) -> None:
        detok = self.tokenizer.detokenizer(request.prompt_token_ids,
                                           skip_special_tokens=request.params.skip_special_tokens)
        matcher = None
        if request.params.stop:
            # A forked completion shares its parent's automaton (no second build, however many).
            parent = self._states.get(request.parent_id) if request.parent_id else None
            automaton = parent.stop_matcher.automaton if parent and parent.stop_matcher else None
            matcher = StopStringMatcher(automaton or automaton_for(request.params.stop))
        self._states[request.request_id] = _TextState(detok, matcher)

    def remove(self, request: Request) -> None:
        self._states.pop(request.request_id, None)

    def add_prompt_logprobs(self, request: Request, position: int, computed: TokenLogprobs) -> None:
        """Logprobs of prompt tokens `position`, `position + 1`, ...; a chunk computed again
        (after a preemption) replaces what it had given."""
        entries = [TokenLogprob(t, lp, rank, list(zip(ids, lps)))
                   for t, lp, rank, ids, lps in zip(computed.token_ids, computed.logprobs, computed.ranks,
                                                    computed.top_token_ids, computed.top_logprobs)]
        logprobs = self._states[request.request_id].prompt_logprobs
        if not logprobs:
            logprobs.append(None)  # the first prompt token has no prediction
        del logprobs[position:]
        if len(logprobs) != position:
            raise RuntimeError(f"prompt logprobs from position {position} follow only {len(logprobs)}")
        logprobs.extend(entries)

    def _prompt_logprobs(self, request: Request) -> list[TokenLogprob | None]:
        """The prompt's logprobs: a forked completion's are its parent's (scored once)."""
        state = self._states[request.request_id]
        if not state.prompt_logprobs and request.parent_id in self._states:
            return self._states[request.parent_id].prompt_logprobs
        return state.prompt_logprobs

    def process_token(self, request: Request, token_id: int, logprob: TokenLogprob | None,
                      grammar: GrammarOutcome | None = None) -> RequestOutput:
        """Append a sampled token to the request, decide whether it finishes, and say what changed.

        `grammar`: the token completed the request's grammar (COMPLETE), so it stops here with
        "stop", or the grammar gave up or overran its time (ERROR, TIMEOUT), so it ends here with
        "grammar" unless something else ends it with this token; the token is part of the
        output. A finishing request is marked finished here; the caller frees its blocks.
        """
        params = request.params
        state = self._states[request.request_id]
        if params.max_tokens == 0:  # scoring only: the prompt (and its logprobs), no output
            request.finish(FinishReason.LENGTH)
            return RequestOutput(
                request_id=request.group_id, index=request.index, new_token_ids=[], text="", finished=True,
                finish_reason=FinishReason.LENGTH.value, prompt_logprobs=self._prompt_logprobs(request) or None,
                num_prompt_tokens=request.num_prompt_tokens,
                num_cached_tokens=request.num_cached_prompt_tokens)
        request.append_token(token_id)
        finish, stop_reason = self._check_token(request, token_id)
        hide_token = finish is FinishReason.STOP and not params.include_stop_str_in_output
        if grammar is GrammarOutcome.COMPLETE and finish is not FinishReason.STOP:
            finish, stop_reason = FinishReason.STOP, None
        elif grammar is not None and grammar is not GrammarOutcome.COMPLETE and finish is None:
            finish, stop_reason = FinishReason.GRAMMAR, grammar.value
        delta = state.detokenizer.push([] if hide_token else [token_id])
        state.held += delta
        text = ""
        stop_string = False  # a stop string ended it: the text after it is dropped
        if state.stop_matcher is not None:
            match = state.stop_matcher.feed(delta)  # one ending before min_tokens outputs does not count
            if (match is not None and finish is not FinishReason.STOP
                    and request.num_output_tokens >= params.min_tokens):
                # It ends in `delta`; it starts in `held`, which keeps all that could begin one.
                start = len(state.held) - len(delta) + match.end - len(match.stop)
                end = start + len(match.stop) if params.include_stop_str_in_output else start
                text, state.held = state.held[:end], ""
                finish, stop_reason, stop_string = FinishReason.STOP, match.stop, True
        if finish is None:
            # Hold back what could still be the start of a stop string.
            keep = state.stop_matcher.held_length if state.stop_matcher is not None else 0
            cut = len(state.held) - keep
            text, state.held = text + state.held[:cut], state.held[cut:]
        elif not stop_string:
            text += state.held + state.detokenizer.flush()
            state.held = ""
        out = RequestOutput(
            request_id=request.group_id, index=request.index, new_token_ids=[token_id], text=text,
            finished=finish is not None, logprobs=[logprob] if logprob is not None else None,
            num_prompt_tokens=request.num_prompt_tokens, num_output_tokens=request.num_output_tokens,
            num_cached_tokens=request.num_cached_prompt_tokens,
        )
        if request.num_output_tokens == 1:
            out.prompt_logprobs = self._prompt_logprobs(request) or None
        if finish is not None:
            request.finish(finish, stop_reason)
            out.finish_reason, out.stop_reason = finish.value, stop_reason
        return out

    def _check_token(self, request: Request, token_id: int) -> tuple[FinishReason | None, int | None]:
        params = request.params
        if request.num_output_tokens >= params.min_tokens:
            if token_id in params.stop_token_ids:
                return FinishReason.STOP, token_id
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return FinishReason.STOP, None
        if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            return FinishReason.LENGTH, None
        if (params.max_tokens is None and params.default_max_tokens is not None
                and request.num_output_tokens >= max(params.default_max_tokens, params.min_tokens)):
            return FinishReason.LENGTH, None
        if request.sink_policy is None and request.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH, None
        return None, None

    def final_output(self, request: Request) -> RequestOutput:
        """The closing output of a request finished from outside (abort, or an error)."""
        state = self._states.get(request.request_id)
        text = ""
        if state is not None and request.finish_reason not in (FinishReason.ABORT, FinishReason.ERROR):
            text = state.held + state.detokenizer.flush()
        return RequestOutput(
            request_id=request.group_id, index=request.index, new_token_ids=[], text=text,
            finished=True, finish_reason=request.finish_reason.value if request.finish_reason else None,
            stop_reason=request.stop_reason, num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens, num_cached_tokens=request.num_cached_prompt_tokens,
        )
