"""Constrained decoding: a grammar per request, a token bitmask per step, through llguidance.

A constrained request carries its grammar in `SamplingParams.grammar`: an llguidance grammar
string, made by `json_schema_grammar`, `regex_grammar`, `choice_grammar` or `lark_grammar`.
Each distinct grammar is compiled once into a matcher (Earley parser plus lazily built lexer)
and kept in a bounded LRU cache; each request gets a copy of it, which follows the tokens the
request samples.

Per step, `start_masks` fills the bitmask of the step's constrained rows in a worker thread
(llguidance drops the GIL) while the model runs the forward pass; the runner waits for it just
before sampling and sets every token outside the grammar to -inf. Rows without a grammar are
left alone, so constrained and unconstrained requests share one batch. When a grammar is
complete (no token but EOS could follow), the request finishes at once with finish reason
"stop"; when `max_tokens` cuts it first, the reason is "length".

llguidance was chosen over xgrammar, the other engine vLLM and SGLang use (measured side by side
on SmolLM2's vocabulary, BENCHMARKS.md "Structured output"): it depends on nothing, where
xgrammar needs transformers, triton and apache-tvm-ffi at run time, and it compiles a schema
2-9x faster (0.84 ms against 7.4 ms), which a request with a new schema waits for. xgrammar
fills a mask faster (0.005 ms against 0.032 ms a row, 0.33 ms against 2.4 ms for 64 rows on
one thread), but the mask is filled while the forward pass runs (tens to hundreds of
milliseconds on a CPU), so that difference is hidden.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import llguidance.torch
import torch

from model.tokenizer import Tokenizer

MAX_CACHED_GRAMMARS = 256
# llguidance's defaults but a fifth of the lexer fuel: a grammar's first mask (its lexer built)
# takes at most some 20 ms, a later one some 3 ms, before the grammar is refused.
PARSER_LIMITS = llguidance.LLParserLimits(initial_lexer_fuel=200_000, step_lexer_fuel=40_000)
# A grammar's source (a JSON schema, a regex, a Lark grammar, choices) is at most this long.
MAX_GRAMMAR_CHARS = 256 * 1024


# JSON is written as json.dumps writes it (", " and ": ", no other whitespace): one layout
# leaves a small model no room to wander into runs of blank lines.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar llguidance cannot compile (or a schema feature it does not support)."""


def json_schema_grammar(schema: dict | bool) -> str:
    """Output that is one JSON value valid against `schema` (`{"type": "object"}`: any object;
    `true`: any JSON value)."""
    if schema is True:
        schema = {}
    if schema is False:
        raise GrammarError("the schema false allows no value")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
    except ValueError as exc:
        raise GrammarError(str(exc)) from None


def regex_grammar(regex: str) -> str:
    """Output that matches `regex` (Rust regex syntax) from start to end."""
    return llguidance.LLMatcher.grammar_from_regex(regex)


def choice_grammar(choices: Sequence[str]) -> str:
    """Output that is exactly one of `choices`."""
    return lark_grammar("start: " + " | ".join(json.dumps(c) for c in choices))


def lark_grammar(lark: str) -> str:
    """Output in the language of a Lark grammar (llguidance's dialect, rule `start`)."""
    return llguidance.LLMatcher.grammar_from_lark(lark)


@dataclass
class _Masks:
    """The bitmask of one step's constrained rows, being filled in a worker thread."""

    rows: list[int]  # sampling rows that have a grammar
    bitmask: torch.Tensor  # [len(rows), ceil(V / 32)] int32, bit t of a row: token t is allowed
    done: Future

    def wait(self) -> tuple[list[int], torch.Tensor]:
        self.done.result()
        return self.rows, self.bitmask

    def settle(self) -> None:
        """Wait for the fill to end, however it ends (after a failed step)."""
        futures.wait([self.done])


class StructuredOutput:
    """The engine's grammars: compiled matchers (cached), and one live matcher per request."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int],
                 max_cached: int = MAX_CACHED_GRAMMARS):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's (it may pad the tokenizer's)
        self.eos_token_ids = list(eos_token_ids)  # any of them ends a complete grammar
        self.max_cached = max_cached
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()  # compile() runs in server worker threads
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        self._worker: ThreadPoolExecutor | None = None
        self._executor: llguidance.LLExecutor | None = None
        self.num_compiled = 0

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """Built on first use (some 0.1 s for a 49k vocabulary)."""
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    llguidance.TokenizerWrapper(_TokenizerView(self.tokenizer)), n_vocab=self.vocab_size,
                    eos_token=self.eos_token_ids or None)
            return self._ll_tokenizer

    def compile(self, grammar: str, salt: str | None = None) -> llguidance.LLMatcher:
        """The compiled matcher of a grammar (cached per `salt`, the request's prefix-cache salt,
        so that one API key can neither time nor wear out another's grammars); raises
        GrammarError if it does not compile, or fails on its first mask (a regex too complex
        for the lexer, a choice of too many items): that work is done here, in the caller's
        thread, and shared by every copy."""
        if len(grammar) > MAX_GRAMMAR_CHARS:
            raise GrammarError(f"the grammar is longer than {MAX_GRAMMAR_CHARS} characters")
        key = (salt, grammar)
        with self._lock:
            matcher = self._compiled.get(key)
            if matcher is not None:
                self._compiled.move_to_end(key)
                return matcher
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0, limits=PARSER_LIMITS)
        if not matcher.is_error():
            matcher.compute_bitmask()
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        with self._lock:
            self.num_compiled += 1
            self._compiled[key] = matcher
            while len(self._compiled) > self.max_cached:
                self._compiled.popitem(last=False)
        return matcher

    def add(self, request_id: str, grammar: str, salt: str | None = None) -> None:
        """Start a request's matcher at the beginning of its grammar."""
        self._matchers[request_id] = self.compile(grammar, salt).deep_copy()

    def fork(self, parent_id: str, child_id: str) -> None:
        """A completion forked from `parent_id` before either sampled: the same grammar state."""
        parent = self._matchers.get(parent_id)
        if parent is not None:
            self._matchers[child_id] = parent.deep_copy()

    def remove(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def start_masks(self, request_ids: Sequence[str]) -> _Masks | None:
        """Begin filling the bitmask of the rows (one per sampled request) that have a grammar;
        None when none has one."""
        rows = [i for i, request_id in enumerate(request_ids) if request_id in self._matchers]
        if not rows:
            return None
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="sinkserve-grammar")
            self._executor = llguidance.LLExecutor()
        bitmask = torch.empty(llguidance.torch.get_bitmask_shape(len(rows), self.vocab_size), dtype=torch.int32)
        matchers = [(self._matchers[request_ids[row]], i) for i, row in enumerate(rows)]
        done = self._worker.submit(llguidance.torch.fill_next_token_bitmask_par, self._executor, matchers, bitmask)
        return _Masks(rows, bitmask, done)

    def accept(self, request_id: str, token_id: int) -> bool:
        """Advance a request's matcher by its sampled token; True when its grammar is complete
        (nothing may follow). Raises GrammarError if the token does not fit (a broken mask)."""
        matcher = self._matchers.get(request_id)
        if matcher is None:
            return False
        if not matcher.consume_token(token_id):
            raise GrammarError(f"token {token_id} does not fit the grammar: {matcher.get_error()}")
        return matcher.is_stopped()


class _TokenizerView:
    """What llguidance reads of a tokenizer: each token's bytes, EOS, and an encoder."""

    def __init__(self, tokenizer: Tokenizer):
        self.eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.bos_token_id = tokenizer.bos_token_id
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        # Special tokens are never text to a grammar: the detokenizer skips them, so a grammar
        # that took `<repo_name>` for its text would see characters the output lacks. Tokens
        # without bytes (control, padding) are special too.
        is_special = getattr(tokenizer, "is_special", lambda i: False)
        named = {tokenizer.bos_token_id, tokenizer.eos_token_id, *tokenizer.end_of_generation_ids}
        self.special_token_ids = sorted({i for i in named if i is not None}
                                        | {i for i, raw in enumerate(self.tokens) if not raw or is_special(i)})
        self._tokenizer = tokenizer
        self._by_bytes: dict[bytes, int] | None = None  # built when first needed
        self._longest = 1

    def __call__(self, text: str | bytes) -> list[int]:
        """Tokens whose bytes are exactly `text` (llguidance forces text a grammar fixes with
        them): the tokenizer's own encoding when it is exact, else the longest tokens first. A
        SentencePiece tokenizer prefixes a space (`{` becomes `▁`, `{`), which a grammar that
        must begin with `{` would then refuse."""
        raw = text if isinstance(text, bytes) else text.encode("utf-8")
        ids = self._tokenizer.encode_text(raw.decode("utf-8", errors="replace"))
        if b"".join(self.tokens[i] for i in ids) == raw:
            return ids
        return self._longest_first(raw)

    def _longest_first(self, raw: bytes) -> list[int]:
        if self._by_bytes is None:
            special = set(self.special_token_ids)
            self._by_bytes = {b: i for i, b in enumerate(self.tokens) if b and i not in special}
            self._longest = max(map(len, self._by_bytes), default=1)
        ids, start = [], 0
        while start < len(raw):
            for end in range(min(len(raw), start + self._longest), start, -1):
                token = self._by_bytes.get(raw[start:end])
                if token is not None:
                    ids.append(token)
                    start = end
                    break
            else:  # a byte no token holds alone: nothing can write it
                raise GrammarError(f"no token writes the byte {raw[start]:#04x}")
        return ids
