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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import llguidance.torch
import torch

from model.tokenizer import Tokenizer

MAX_CACHED_GRAMMARS = 256
# A grammar's source (a JSON schema, a regex, a Lark grammar, choices) is at most this long.
MAX_GRAMMAR_CHARS = 256 * 1024


# JSON is written as json.dumps writes it (", " and ": ", no other whitespace): one layout
# leaves a small model no room to wander into runs of blank lines.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar llguidance cannot compile (or a schema feature it does not support)."""


def json_schema_grammar(schema: dict | bool) -> str:
    """Output that is one JSON value valid against `schema` (`{"type": "object"}`: any object)."""
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

    def compile(self, grammar: str) -> llguidance.LLMatcher:
        """The compiled matcher of a grammar (cached); raises GrammarError if it does not compile."""
        if len(grammar) > MAX_GRAMMAR_CHARS:
            raise GrammarError(f"the grammar is longer than {MAX_GRAMMAR_CHARS} characters")
        with self._lock:
            matcher = self._compiled.get(grammar)
            if matcher is not None:
                self._compiled.move_to_end(grammar)
                return matcher
        tokenizer = self.ll_tokenizer
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise GrammarError("; ".join(messages))
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        with self._lock:
            self.num_compiled += 1
            self._compiled[grammar] = matcher
            while len(self._compiled) > self.max_cached:
                self._compiled.popitem(last=False)
        return matcher

    def add(self, request_id: str, grammar: str) -> None:
        """Start a request's matcher at the beginning of its grammar."""
        self._matchers[request_id] = self.compile(grammar).deep_copy()

    def fork(self, parent_id: str, child_id: str) -> None:
        """A completion forked from `parent_id` before either sampled: the same grammar state."""
        parent = self._matchers.get(parent_id)
        if parent is not None:
            self._matchers[child_id] = parent.deep_copy()

    def remove(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def has_grammar(self, request_id: str) -> bool:
        return request_id in self._matchers

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

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)


class _TokenizerView:
    """What llguidance reads of a tokenizer: each token's bytes, EOS, and an encoder."""

    def __init__(self, tokenizer: Tokenizer):
        self.eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.bos_token_id = tokenizer.bos_token_id
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        named = {tokenizer.bos_token_id, tokenizer.eos_token_id, *tokenizer.end_of_generation_ids}
        self.special_token_ids = sorted(i for i in named if i is not None)
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode_text(text)
