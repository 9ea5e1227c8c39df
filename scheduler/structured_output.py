"""Constrained decoding: a grammar per request, a token bitmask per step, through llguidance.

A constrained request carries its grammar in `SamplingParams.grammar`: an llguidance grammar
string, made by `json_schema_grammar`, `regex_grammar`, `choice_grammar` or `lark_grammar`.
Each distinct grammar is compiled once into a matcher (Earley parser plus lazily built lexer)
and kept in a cache bounded by entries and bytes, shared fairly between API keys
(scheduler/grammar_cache.py); each request gets a copy of it, which follows the tokens the
request samples. The server compiles a grammar only after it has compiled, in a sandbox
process, within a time, memory and stack bound (server/grammar_compiler.py).

Per step, `start_masks` fills the bitmask of the step's constrained rows in a worker thread
(llguidance drops the GIL), one row after another, while the model runs the forward pass; the
runner waits for it just before sampling and sets every token outside the grammar to -inf. Rows
without a grammar are left alone, so constrained and unconstrained requests share one batch.
When a grammar is complete (no token but EOS could follow), the request finishes at once with
finish reason "stop"; when `max_tokens` cuts it first, the reason is "length". A grammar that
gives up on a token (its lexer or Earley parser past its limits), or whose mask took longer
than `mask_timeout`, ends its request alone with finish reason "grammar" (stop_reason
"grammar_error" or "grammar_timeout"; the server shows it as OpenAI's "length").

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
import logging
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import llguidance
import torch

from model.tokenizers.tokenizer import Tokenizer
from scheduler.grammar_cache import GrammarCache
from scheduler.grammar_vocab import (DEFAULT_GRAMMAR_CACHE_BYTES, DEFAULT_GRAMMAR_MASK_TIMEOUT, MAX_GRAMMAR_CHARS,
                                     PARSER_LIMITS, GrammarVocab)
from scheduler.request import GrammarOutcome

logger = logging.getLogger(__name__)

MAX_CACHED_GRAMMARS = 256
# What a grammar compiled without a measurement (the offline API; the server measures each in
# its sandbox) is taken to hold.
UNMEASURED_GRAMMAR_BYTES = 256 * 2**10


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
    overran: list[int] = field(default_factory=list)  # rows whose mask took longer than the budget

    def wait(self) -> tuple[list[int], torch.Tensor]:
        self.done.result()
        return self.rows, self.bitmask

    def settle(self) -> None:
        """Wait for the fill to end, however it ends (after a failed step)."""
        futures.wait([self.done])


class StructuredOutput:
    """The engine's grammars: compiled matchers (cached), and one live matcher per request."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int],
                 max_cached: int = MAX_CACHED_GRAMMARS, max_cached_bytes: int = DEFAULT_GRAMMAR_CACHE_BYTES,
                 mask_timeout: float = DEFAULT_GRAMMAR_MASK_TIMEOUT):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's (it may pad the tokenizer's)
        self.eos_token_ids = list(eos_token_ids)  # any of them ends a complete grammar
        self.mask_timeout = mask_timeout
        self.cache: GrammarCache[llguidance.LLMatcher] = GrammarCache(max_cached, max_cached_bytes)
        self._vocab: GrammarVocab | None = None
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        self._worker: ThreadPoolExecutor | None = None
        self.num_compiled = 0
        self.num_mask_timeouts = 0
        self.num_grammar_errors = 0

    @property
    def vocab(self) -> GrammarVocab:
        """What llguidance reads of the tokenizer (built on first use: some 0.1 s for 49k tokens)."""
        with self._lock:
            if self._vocab is None:
                self._vocab = GrammarVocab.of(self.tokenizer)
            return self._vocab

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            vocab = self.vocab
            with self._lock:
                if self._ll_tokenizer is None:
                    self._ll_tokenizer = llguidance.LLTokenizer(
                        llguidance.TokenizerWrapper(vocab), n_vocab=self.vocab_size,
                        eos_token=self.eos_token_ids or None)
        return self._ll_tokenizer

    def cached(self, grammar: str, salt: str | None = None) -> llguidance.LLMatcher | None:
        return self.cache.get((salt, grammar))

    def compile(self, grammar: str, salt: str | None = None, tenant: str | None = None,
                num_bytes: int | None = None) -> llguidance.LLMatcher:
        """The compiled matcher of a grammar, cached per `salt` (the request's prefix-cache salt,
        so that one API key can neither time nor wear out another's grammars) in `tenant`'s
        share of the cache (its API key's; `num_bytes`: what the grammar measured in the
        server's sandbox). Raises GrammarError if it does not compile, or fails on its first
        mask (a regex too complex for the lexer, a choice of too many items): that work is done
        here, in the caller's thread, and shared by every copy. The server tries a grammar in a
        sandbox process first (server/grammar_compiler.py); this compiles whatever it is given."""
        if len(grammar) > MAX_GRAMMAR_CHARS:
            raise GrammarError(f"the grammar is longer than {MAX_GRAMMAR_CHARS} characters")
        matcher = self.cached(grammar, salt)
        if matcher is not None:
            return matcher
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0,
                                       limits=llguidance.LLParserLimits(**PARSER_LIMITS))
        if not matcher.is_error():
            matcher.compute_bitmask()
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        with self._lock:
            self.num_compiled += 1
        self.cache.put((salt, grammar), matcher, tenant, num_bytes or UNMEASURED_GRAMMAR_BYTES)
        return matcher

    def add(self, request_id: str, grammar: str, salt: str | None = None,
            compiled: llguidance.LLMatcher | None = None) -> None:
        """Start a request's matcher at the beginning of its grammar (`compiled`: the server's,
        compiled before the request was admitted; else compiled, or found in the cache, here)."""
        self._matchers[request_id] = (compiled or self.compile(grammar, salt)).deep_copy()

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
        bitmask = torch.empty((len(rows), -(-self.vocab_size // 32)), dtype=torch.int32)
        matchers = [self._matchers[request_ids[row]] for row in rows]
        overran: list[int] = []
        done = self._worker.submit(self._fill, matchers, rows, bitmask, overran)
        return _Masks(rows, bitmask, done, overran)

    def _fill(self, matchers: list[llguidance.LLMatcher], rows: list[int], bitmask: torch.Tensor,
              overran: list[int]) -> None:
        """Fill the rows one by one (llguidance drops the GIL), timing each in this thread's CPU
        time (a busy machine that leaves the thread waiting is not the grammar's doing): a row
        over the budget has its request ended after this step, which its mask still serves."""
        for i, matcher in enumerate(matchers):
            start = time.thread_time()
            row = bitmask[i]  # llguidance.torch's fill, without importing that module (it compiles with torch.compile)
            matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
            if time.thread_time() - start > self.mask_timeout:
                overran.append(rows[i])

    def accept(self, request_id: str, token_id: int, overran: bool = False) -> GrammarOutcome | None:
        """Advance a request's matcher by its sampled token. The outcome that ends the request:
        COMPLETE when nothing may follow, ERROR when the matcher gave up on the
        token (its lexer or parser ran past its limits; logged), TIMEOUT when this
        step's mask took longer than the budget (`overran`); None: it goes on."""
        matcher = self._matchers.get(request_id)
        if matcher is None:
            return None
        if not matcher.consume_token(token_id):
            self.num_grammar_errors += 1
            logger.warning("request %s: its grammar gave up at token %d: %s", request_id, token_id,
                           matcher.get_error()[:500])
            return GrammarOutcome.ERROR
        if matcher.is_stopped():
            return GrammarOutcome.COMPLETE
        if overran:
            self.num_mask_timeouts += 1
            logger.warning("request %s: a mask of its grammar took longer than %.3f s", request_id, self.mask_timeout)
            return GrammarOutcome.TIMEOUT
        return None
