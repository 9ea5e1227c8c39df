"""Hugging Face `tokenizer.json` tokenizers (byte-level BPE, SentencePiece-converted, ...) through
the `tokenizers` library, and the same for the vocabulary of a GGUF file.

Streaming: a tokenizer whose decoder is byte-level (GPT-2, Llama 3, SmolLM2) maps every token
to bytes, so its detokenizer is exact by construction (`ByteLevelDetokenizer`); any other
decoder is streamed by decoding a short window of recent ids (`WindowDetokenizer`).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as Backend

from model.tokenizers.tokenizer import (Tokenizer, TokenizerError, chat_template_of, drop_seen_replacements, read_json,
                             replace_lone_surrogates)

_REPLACEMENT = "\ufffd"
_BYTE_PIECE = re.compile("<0x[0-9A-Fa-f]{2}>")


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable character for each byte value, indexed by the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


_BYTE_OF_CHAR = {c: b for b, c in enumerate(byte_level_alphabet())}


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus the special-token settings and chat template of its checkpoint.

    BOS/EOS are added by sinkserve from `add_bos_token`/`add_eos_token` (read from
    tokenizer_config.json, else from what the tokenizer's post-processor does), so that
    `encode(text, add_bos=False)` is always the bare text."""

    def __init__(self, backend: Backend, *, bos_token_id: int | None, eos_token_id: int | None,
                 add_bos_token: bool, add_eos_token: bool, chat_template: str | None,
                 end_of_generation_ids: tuple[int, ...] = ()):
        self.backend = backend
        self.end_of_generation_ids = end_of_generation_ids
        # The largest id + 1: a vocabulary that lists a string twice has fewer strings than ids.
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self._backend_vocab_size = self.vocab_size
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.chat_template = chat_template
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        decoder = json.loads(backend.to_str()).get("decoder") or {}
        parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
        self.byte_level = bool(parts) and all(p.get("type") == "ByteLevel" for p in parts)
        # ByteFallback decodes a run of "<0xNN>" tokens as a whole (all U+FFFD if it is not
        # UTF-8): a stream must not emit text while such a run may go on.
        byte_fallback = any(p.get("type") == "ByteFallback" for p in parts)
        self._byte_fallback_ids = frozenset(
            i for i in range(self.vocab_size) if byte_fallback and _BYTE_PIECE.fullmatch(self.id_to_piece(i)))
        self._bytes = [self._piece_bytes(i) for i in range(self.vocab_size)]

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> HFTokenizer:
        model_dir = Path(model_dir)
        try:
            backend = Backend.from_file(str(model_dir / "tokenizer.json"))
        except Exception as exc:  # the Rust side raises a bare Exception for a malformed file
            raise TokenizerError(f"cannot read {model_dir / 'tokenizer.json'}: {exc}") from None
        tok_cfg = read_json(model_dir / "tokenizer_config.json")
        cfg = read_json(model_dir / "config.json")

        def special_id(name: str) -> int | None:
            if f"{name}_token" in tok_cfg and tok_cfg[f"{name}_token"] is None:
                return None  # said to have none (Qwen's bos_token: null)
            token = tok_cfg.get(f"{name}_token")
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str) and backend.token_to_id(token) is not None:
                return backend.token_to_id(token)
            cfg_id = cfg.get(f"{name}_token_id")
            if isinstance(cfg_id, list):  # several stop ids: the first is the canonical one
                cfg_id = cfg_id[0] if cfg_id else None
            return cfg_id if isinstance(cfg_id, int) else None

        bos, eos = special_id("bos"), special_id("eos")
        # Without explicit flags, do what the tokenizer's post-processor does to a text.
        bare = backend.encode("a", add_special_tokens=False).ids
        full = backend.encode("a", add_special_tokens=True).ids
        add_bos = tok_cfg.get("add_bos_token", bos is not None and full[:1] == [bos] and bare[:1] != [bos])
        add_eos = tok_cfg.get("add_eos_token", eos is not None and full[-1:] == [eos] and bare[-1:] != [eos])
        return cls(backend, bos_token_id=bos, eos_token_id=eos, add_bos_token=bool(add_bos),
                   add_eos_token=bool(add_eos), chat_template=chat_template_of(model_dir, tok_cfg))

    @classmethod
    def from_gguf(cls, path: str | Path) -> HFTokenizer:
        from model.checkpoints.gguf_checkpoint import open_gguf
        from model.tokenizers.gguf_tokenizer import tokenizer_from_gguf

        try:
            spec = tokenizer_from_gguf(open_gguf(path))
        except TokenizerError:
            raise
        except Exception as exc:  # inconsistent metadata: bad ids, merges of unknown tokens, ...
            raise TokenizerError(f"cannot build the tokenizer of {Path(path).name}: {exc}") from None
        return cls(spec.backend, bos_token_id=spec.bos_token_id, eos_token_id=spec.eos_token_id,
                   add_bos_token=spec.add_bos_token, add_eos_token=spec.add_eos_token,
                   chat_template=spec.chat_template, end_of_generation_ids=spec.end_of_generation_ids)

    def encode_text(self, text: str) -> list[int]:
        # Added tokens in the text are matched by the backend, as transformers does. The batch
        # call lets go of the GIL while it works (`encode` holds it: 5 s for 3 MB of text, during
        # which the server's event loop could not run); the tokens are the same.
        return self.backend.encode_batch([text], add_special_tokens=False)[0].ids

    def encode_with_special_tokens(self, text: str) -> list[int]:
        return self.encode_text(replace_lone_surrogates(text))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        n = self._backend_vocab_size  # ids past it are padding: no text
        return self.backend.decode([i for i in map(int, ids) if i < n], skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, id: int) -> str:
        return self.backend.id_to_token(int(id)) or ""

    def token_bytes(self, id: int) -> bytes:
        return self._bytes[int(id)]

    def is_special(self, id: int) -> bool:
        return id in self._special_ids

    def detokenizer(self, prompt_ids: Iterable[int] = (), *, skip_special_tokens: bool = True):
        if self.byte_level:
            return ByteLevelDetokenizer(self, prompt_ids, skip_special_tokens=skip_special_tokens)
        return WindowDetokenizer(self, prompt_ids, skip_special_tokens=skip_special_tokens)

    def pad_vocab(self, vocab_size: int) -> None:
        if vocab_size > self.vocab_size:
            self._bytes += [b""] * (vocab_size - self.vocab_size)
            self.vocab_size = vocab_size

    def _piece_bytes(self, i: int) -> bytes:
        piece = self.id_to_piece(i)
        if self.byte_level:
            # The ByteLevel decoder's rule: a token maps char by char to bytes, or, if one of its
            # chars is not in the map (an added token's text), is its own UTF-8.
            try:
                return bytes(_BYTE_OF_CHAR[c] for c in piece)
            except KeyError:
                return piece.encode()
        # SentencePiece-style: "▁" is a space, "<0xNN>" a byte (decoding one token alone would
        # strip the leading space and show a lone byte as U+FFFD).
        if i in self._byte_fallback_ids:
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()


class ByteLevelDetokenizer:
    """Exact streaming for byte-level tokenizers: every token is bytes, and the text is their
    concatenation decoded as UTF-8 with U+FFFD for each maximal invalid subsequence (what both
    Rust's from_utf8_lossy and Python's "replace" do), so an incremental decoder reproduces
    `decode()` whatever the split. Bytes of an unfinished character are held back."""

    def __init__(self, tokenizer: HFTokenizer, prompt_ids: Iterable[int] = (), *, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip_special = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._hide = 0
        self.push(prompt_ids)
        # decode(prompt) shows the bytes still pending at its end as U+FFFDs (one per maximal
        # invalid subsequence). If the output finishes the character, decode(prompt) is no
        # prefix and the character comes out whole; if not, those U+FFFDs come out again
        # first: drop them, as the caller has seen them.
        pending = self._utf8.getstate()[0]
        self._hide = pending.decode("utf-8", "replace").count(_REPLACEMENT)

    def push(self, token_ids: Iterable[int]) -> str:
        tok = self._tok
        data = bytearray()
        for i in map(int, token_ids):
            if not 0 <= i < tok.vocab_size:
                raise ValueError(f"token id {i} out of range for vocab size {tok.vocab_size}")
            if not (self._skip_special and i in tok._special_ids):
                data += tok._bytes[i]
        return self._emit(self._utf8.decode(bytes(data)))

    def flush(self) -> str:
        return self._emit(self._utf8.decode(b"", final=True))

    def _emit(self, text: str) -> str:
        if self._hide and text:
            text, self._hide = drop_seen_replacements(text, self._hide)
        return text


class WindowDetokenizer:
    """Streaming for any other decoder: the text of the newest ids is the decode of a short
    window of recent ids minus the decode of the window's older part; text that ends in U+FFFD
    (an unfinished character), or a run of byte-fallback tokens, waits for the next id."""

    def __init__(self, tokenizer: HFTokenizer, prompt_ids: Iterable[int] = (), *, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip_special = skip_special_tokens
        prompt = list(prompt_ids)
        start = max(len(prompt) - 6, 0)  # enough context for a leading space or a split character
        while start > 0 and (prompt[start] in tokenizer._byte_fallback_ids  # never inside a byte run
                             or (start > len(prompt) - 64 and not self._decode(prompt[start:]))):
            start -= 1  # nor only skipped special tokens, whose decode is empty
        self._ids = prompt[start:]
        self._prefix = 0  # window start
        self._read = len(self._ids)  # ids before this have been emitted
        self._in_byte_run = False

    def push(self, token_ids: Iterable[int]) -> str:
        new = [int(i) for i in token_ids]
        for i in new:
            if not 0 <= i < self._tok.vocab_size:
                raise ValueError(f"token id {i} out of range for vocab size {self._tok.vocab_size}")
        self._ids += new
        for i in new:
            if not (self._skip_special and self._tok.is_special(i)):  # a skipped token joins two runs
                self._in_byte_run = i in self._tok._byte_fallback_ids
        if not new or self._in_byte_run:
            return ""
        seen = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(seen) or text.endswith(_REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return _new_text(seen, text)

    def flush(self) -> str:
        seen = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return _new_text(seen, text)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip_special)


def _new_text(seen: str, text: str) -> str:
    """What `text` adds to `seen`. Where the new ids finished a character that `seen` showed
    as U+FFFD, `seen` is no prefix: the character comes out whole."""
    if text.startswith(seen):
        return text[len(seen):]
    n = 0
    while n < min(len(seen), len(text)) and seen[n] == text[n]:
        n += 1
    return text[n:]
