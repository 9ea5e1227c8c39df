"""What llguidance reads of a tokenizer, and the limits it compiles grammars under. No torch.

Both the engine (scheduler/structured_output.py) and the grammar compiler's sandbox processes
(server/grammar_worker.py, which import nothing heavier than llguidance) build their
`llguidance.LLTokenizer` from a `GrammarVocab`, so that a grammar tried in a sandbox is
compiled there exactly as the engine will compile it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# llguidance's defaults but a fifth of the lexer fuel (a grammar's first mask, its lexer built,
# takes at most some 20 ms, a later one some 3 ms, before the grammar is refused) and at most
# 1,100 Earley items in a row: llguidance's 2,000 let an ambiguous grammar's masks grow to a
# third of a second each before it fails (measured on SmolLM2's vocabulary, `start: x`,
# `x: "a" | x x | x x x`: 353 ms, 9 s in all), 1,100 to 58 ms, and still take a choice of
# 1,024 strings (protocol.MAX_CHOICES) in its first row.
# At most 20,000 lexer states (1-2 KB each, built as a mask needs them), not 250,000: random
# walks of 300 tokens through a JSON schema, any JSON, a 128-tool call grammar and a date
# regex never needed 500.
PARSER_LIMITS = {"initial_lexer_fuel": 200_000, "step_lexer_fuel": 40_000, "max_items_in_row": 1_100,
                 "max_lexer_states": 20_000}
# A grammar's source (a JSON schema, a regex, a Lark grammar, choices) is at most this long.
MAX_GRAMMAR_CHARS = 256 * 1024
# Seconds one row's mask may take before its request is ended (finish reason "grammar"): a
# JSON schema's mask takes well under a millisecond on SmolLM2's 49k vocabulary, a 128-tool
# call grammar's 0.2 ms, the first of a 2.7 MiB lexer's 3 ms (--grammar-mask-timeout).
DEFAULT_GRAMMAR_MASK_TIMEOUT = 0.02
# Bytes of compiled grammars cached at most (--grammar-cache-memory).
DEFAULT_GRAMMAR_CACHE_BYTES = 256 * 2**20


class GrammarVocab:
    """Each token's bytes, the special tokens (never text to a grammar), EOS, and an encoder
    of forced text: llguidance.TokenizerWrapper reads these attributes and calls the object."""

    def __init__(self, tokens: Sequence[bytes], special_token_ids: Sequence[int], eos_token_id: int,
                 bos_token_id: int | None = None, encode: Callable[[str], list[int]] | None = None):
        self.tokens = list(tokens)
        self.special_token_ids = sorted(special_token_ids)
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self._encode = encode
        self._by_bytes: dict[bytes, int] | None = None  # built when first needed
        self._longest = 1

    @classmethod
    def of(cls, tokenizer) -> GrammarVocab:
        """The vocabulary of a model.tokenizer.Tokenizer. Special tokens are never text to a
        grammar: the detokenizer skips them, so a grammar that took `<repo_name>` for its text
        would see characters the output lacks. Tokens without bytes (control, padding) are
        special too."""
        tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        is_special = getattr(tokenizer, "is_special", lambda i: False)
        named = {tokenizer.bos_token_id, tokenizer.eos_token_id, *tokenizer.end_of_generation_ids}
        special = {i for i in named if i is not None} | {i for i, raw in enumerate(tokens) if not raw or is_special(i)}
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        return cls(tokens, special, eos, tokenizer.bos_token_id, tokenizer.encode_text)

    def payload(self) -> dict:
        """What a sandbox process needs to build the same vocabulary (its encoder is the
        byte-exact one: the model's tokenizer stays in the server)."""
        return {"tokens": self.tokens, "special_token_ids": self.special_token_ids,
                "eos_token_id": self.eos_token_id, "bos_token_id": self.bos_token_id}

    def __call__(self, text: str | bytes) -> list[int]:
        """Tokens whose bytes are exactly `text` (llguidance forces text a grammar fixes with
        them): the tokenizer's own encoding when it is exact, else the longest tokens first. A
        SentencePiece tokenizer prefixes a space (`{` becomes `▁`, `{`), which a grammar that
        must begin with `{` would then refuse."""
        raw = text if isinstance(text, bytes) else text.encode("utf-8")
        if self._encode is not None:
            ids = self._encode(raw.decode("utf-8", errors="replace"))
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
                raise ValueError(f"no token writes the byte {raw[start]:#04x}")
        return ids
