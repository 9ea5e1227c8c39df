"""SentencePiece tokenizer (a checkpoint's `tokenizer.model`), plus streaming detokenization."""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from model.tokenizers.tokenizer import (Tokenizer, TokenizerError, chat_template_of, drop_seen_replacements, read_json,
                             replace_lone_surrogates)

_SPACE = "\u2581"  # SentencePiece's "▁" word-boundary marker
_REPLACEMENT = "\ufffd"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model plus the special-token settings of a Hugging Face checkpoint.

    `decode` is SentencePiece's own decode. `SentencePieceDetokenizer` reproduces it token by
    token from the per-token bytes table (`token_bytes`)."""

    def __init__(self, sp: spm.SentencePieceProcessor, bos_token_id: int | None, eos_token_id: int | None,
                 add_bos_token: bool = True, add_eos_token: bool = False,
                 chat_template: str | None = None):
        self.sp = sp
        self.vocab_size = sp.vocab_size()
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.chat_template = chat_template

        n = self.vocab_size
        self._is_byte = [sp.is_byte(i) for i in range(n)]
        self._is_control = [sp.is_control(i) for i in range(n)]
        self._bytes = [self._piece_bytes(i) for i in range(n)]
        # Pieces that lose their leading "▁" when they open the text (the dummy prefix).
        self._leading_space = [
            not (self._is_byte[i] or self._is_control[i] or sp.is_unknown(i))
            and sp.id_to_piece(i).startswith(_SPACE)
            for i in range(n)
        ]
        # The wheel ships no protobuf runtime to read the normalizer spec, so ask decode how
        # it treats a leading "▁": stripped at all (add_dummy_prefix or
        # remove_extra_whitespaces), and, for a lone "▁" piece, stripped again from the next
        # piece while the text is still empty (remove_extra_whitespaces only).
        first = next((i for i in range(n) if self._leading_space[i]), None)
        self._strips_prefix = (first is not None
                               and sp.decode([first]) == self._bytes[first][1:].decode())
        lone = sp.piece_to_id(_SPACE)
        self._strips_repeatedly = self._leading_space[lone] and sp.decode([lone, lone]) == ""

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> SentencePieceTokenizer:
        model_dir = Path(model_dir)
        model_file = model_dir / "tokenizer.model"
        if not model_file.is_file():
            raise TokenizerError(f"SentencePiece model not found: {model_file}")
        try:
            sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as exc:  # not a SentencePiece model
            raise TokenizerError(f"cannot read {model_file}: {exc}") from None
        tok_cfg = read_json(model_dir / "tokenizer_config.json")
        cfg = read_json(model_dir / "config.json")

        def special_id(name: str, fallback: int) -> int | None:
            token = tok_cfg.get(f"{name}_token")
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str):
                i = sp.piece_to_id(token)
                # piece_to_id answers unk for pieces it does not know; only trust a real hit.
                if sp.id_to_piece(i) == token:
                    return i
            cfg_id = cfg.get(f"{name}_token_id")
            if isinstance(cfg_id, list):  # several stop ids: the first is the canonical one
                cfg_id = cfg_id[0] if cfg_id else None
            if isinstance(cfg_id, int):
                return cfg_id
            return fallback if fallback >= 0 else None  # sentencepiece says -1 for "none"

        return cls(
            sp,
            bos_token_id=special_id("bos", sp.bos_id()),
            eos_token_id=special_id("eos", sp.eos_id()),
            add_bos_token=bool(tok_cfg.get("add_bos_token", True)),
            add_eos_token=bool(tok_cfg.get("add_eos_token", False)),
            chat_template=chat_template_of(model_dir, tok_cfg),
        )

    def encode_text(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_with_special_tokens(self, text: str) -> list[int]:
        specials = {self.id_to_piece(i): i for i in (self.bos_token_id, self.eos_token_id) if i is not None}
        if not specials:
            return self.encode_text(replace_lone_surrogates(text))
        ids: list[int] = []
        for piece in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
            if piece in specials:
                ids.append(specials[piece])
            elif piece:
                ids.extend(self.encode_text(replace_lone_surrogates(piece)))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            n = self.sp.vocab_size()  # ids past it are padding: no text
            return self.sp.decode([int(i) for i in ids if int(i) < n])
        # Control tokens rendered as their pieces ("<s> Once", as Hugging Face shows it).
        detok = SentencePieceDetokenizer(self, [], skip_special_tokens=False)
        return detok.push(ids) + detok.flush()

    def detokenizer(self, prompt_ids: Iterable[int] = (), *, skip_special_tokens: bool = True
                    ) -> SentencePieceDetokenizer:
        return SentencePieceDetokenizer(self, prompt_ids, skip_special_tokens=skip_special_tokens)

    def pad_vocab(self, vocab_size: int) -> None:
        # Padded ids behave as control tokens: no text.
        extra = vocab_size - self.vocab_size
        if extra <= 0:
            return
        self._is_byte += [False] * extra
        self._is_control += [True] * extra
        self._leading_space += [False] * extra
        self._bytes += [b""] * extra
        self.vocab_size = vocab_size

    def id_to_piece(self, id: int) -> str:
        id = int(id)
        return self.sp.id_to_piece(id) if id < self.sp.vocab_size() else ""

    def token_bytes(self, id: int) -> bytes:
        # What the token adds to the text, before any dummy-prefix space is stripped.
        return self._bytes[int(id)]

    def _piece_bytes(self, i: int) -> bytes:
        if self._is_control[i]:
            return b""
        if self._is_byte[i]:
            return bytes([int(self.sp.id_to_piece(i)[3:5], 16)])  # "<0xNN>"
        if self.sp.is_unknown(i):
            return self.sp.decode([i]).encode()  # the model's unk surface, e.g. " ⁇ "
        return self.sp.id_to_piece(i).replace(_SPACE, " ").encode()


class SentencePieceDetokenizer:
    """Turns a stream of generated token ids into text deltas, in O(1) amortised per token
    (plus one pass over the prompt at construction).

    All deltas plus `flush()` equal `decode(prompt + output)[len(decode(prompt)):]` whenever
    `decode(prompt)` is a prefix of that, and `decode(output)` for an empty prompt. Bytes of an
    unfinished UTF-8 character are held back, so no delta ever splits a character."""

    def __init__(self, tokenizer: SentencePieceTokenizer, prompt_ids: Iterable[int] = (),
                 *, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip_special = skip_special_tokens
        self._pending = b""       # bytes of an unfinished character (a run of byte pieces)
        self._text_seen = False   # has the decoded text (prompt included) become non-empty?
        self._at_start = tokenizer._strips_prefix  # SentencePiece's is_bos_ws
        self._ws_consumed = False
        self._hide = 0
        # Replay the prompt so the dummy-prefix state and any half-finished character carry
        # over into the output; its text is the caller's already.
        self.push(prompt_ids)
        # decode(prompt) shows each held byte as its own U+FFFD. If the output ends the
        # character badly, those U+FFFDs come out again first: drop them, as the caller has
        # seen them. If the output completes the character, decode(prompt) is no prefix and
        # the character is emitted whole.
        self._hide = len(self._pending)

    def flush(self) -> str:
        return self._emit(self._drain(final=True))

    def push(self, token_ids: Iterable[int]) -> str:
        tok = self._tok
        out = []
        for i in token_ids:
            i = int(i)
            if not 0 <= i < tok.vocab_size:
                raise ValueError(f"token id {i} out of range for vocab size {tok.vocab_size}")
            if tok._is_byte[i]:
                self._pending += tok._bytes[i]
                out.append(self._emit(self._drain(final=False)))
                continue
            # SentencePiece decodes each run of byte pieces on its own: any other token ends it.
            out.append(self._emit(self._drain(final=True)))
            # Mirrors SentencePiece's Decode(): the dummy-prefix "▁" is stripped only while
            # the text is still empty (and, without remove_extra_whitespaces, only once).
            if self._ws_consumed or self._text_seen:
                self._at_start = False
            data = tok._bytes[i]
            self._ws_consumed = False
            if tok._is_control[i] and not self._skip_special:
                data = tok.id_to_piece(i).encode()
            elif self._at_start and tok._leading_space[i]:
                data = data[1:]
                self._ws_consumed = not tok._strips_repeatedly
            out.append(self._emit(data.decode()))
        return "".join(out)

    def _drain(self, final: bool) -> str:
        # SentencePiece, unlike Python's errors="replace" (one U+FFFD per maximal invalid
        # subsequence), turns every byte that does not start a valid character into its own
        # U+FFFD and rescans from the next byte: b"\xe4\xbd" + "A" is "\ufffd\ufffdA", not
        # "\ufffdA". The strict decoder only tells us where the bad byte is; we replace that
        # byte alone so that streaming agrees with decode() byte for byte.
        out = []
        buf = self._pending
        while buf:
            try:
                text, used = codecs.utf_8_decode(buf, "strict", final)
            except UnicodeDecodeError as err:
                out.append(buf[:err.start].decode() + _REPLACEMENT)
                buf = buf[err.start + 1:]
                continue
            out.append(text)
            buf = buf[used:]
            break
        self._pending = buf
        return "".join(out)

    def _emit(self, text: str) -> str:
        if not text:
            return text
        self._text_seen = True
        if self._hide:
            text, self._hide = drop_seen_replacements(text, self._hide)
        return text

