"""What the server needs of a tokenizer, and which one a checkpoint gets.

Two implementations: `SentencePieceTokenizer` (a `tokenizer.model`) and `HFTokenizer` (a
Hugging Face `tokenizer.json` through the `tokenizers` library, or a GGUF file's vocabulary).
A checkpoint with a `tokenizer.json` gets the second, one with only `tokenizer.model` the first.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_lone_surrogates(text: str) -> str:
    """A lone UTF-16 surrogate (JSON allows "\\ud800") is not text: it becomes U+FFFD."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def drop_seen_replacements(text: str, count: int) -> tuple[str, int]:
    """`text` without up to `count` leading U+FFFDs, and how many are still to drop (none once
    other text came). For a detokenizer whose prompt ended inside a character: decode(prompt)
    showed its bytes as U+FFFDs, which the caller has seen already."""
    n = 0
    while n < min(count, len(text)) and text[n] == "\ufffd":
        n += 1
    return text[n:], 0 if n < len(text) else count - n


class TokenizerError(ValueError):
    """A tokenizer that is missing or does not fit the model; the message says which file."""


class Detokenizer(Protocol):
    """Turns generated ids into text deltas for streaming.

    All deltas plus `flush()` equal `decode(prompt + output)[len(decode(prompt)):]` whenever
    `decode(prompt)` is a prefix of that, and `decode(output)` for an empty prompt; no delta
    ends inside a character."""

    def push(self, token_ids: Iterable[int]) -> str: ...

    def flush(self) -> str: ...


class Tokenizer(ABC):
    """Text <-> token ids, the special tokens, and the chat template of a checkpoint.

    `bos_token_id` and `eos_token_id` are None when the tokenizer has no such token;
    `end_of_generation_ids` are more stop tokens it knows of (a GGUF's end-of-turn tokens)."""

    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    end_of_generation_ids: tuple[int, ...] = ()
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; `add_bos` None follows the checkpoint's setting."""
        ids = self.encode_text(replace_lone_surrogates(text))
        if (self.add_bos_token if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        if self.add_eos_token and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    @abstractmethod
    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text` alone: no BOS or EOS."""

    @abstractmethod
    def encode_with_special_tokens(self, text: str) -> list[int]:
        """Token ids of rendered chat text: special-token text (`<s>`, `<|im_start|>`) becomes
        its id; no BOS is added."""

    @abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str: ...

    @abstractmethod
    def id_to_piece(self, id: int) -> str:
        """The vocabulary entry of an id, as the tokenizer spells it ("▁the", "Ġthe")."""

    @abstractmethod
    def token_bytes(self, id: int) -> bytes:
        """The bytes a token adds to the text (special tokens: their text)."""

    @abstractmethod
    def detokenizer(self, prompt_ids: Iterable[int] = (), *, skip_special_tokens: bool = True) -> Detokenizer:
        """A streaming detokenizer for output that follows `prompt_ids`."""

    @abstractmethod
    def pad_vocab(self, vocab_size: int) -> None:
        """Accept ids up to `vocab_size` (a model's padded embedding rows): they decode to ""."""

    def special_token_texts(self) -> dict[str, str]:
        """`bos_token` and `eos_token` (when the tokenizer has them), for chat templates."""
        named = {"bos_token": self.bos_token_id, "eos_token": self.eos_token_id}
        return {name: self.id_to_piece(i) for name, i in named.items() if i is not None}


def check_vocab_size(tokenizer: Tokenizer, model_vocab_size: int, where: str) -> None:
    """Refuse a tokenizer that cannot be this model's: more ids than the embedding has rows,
    or far fewer (a model's vocabulary may be padded, to a multiple of 64 say, not more)."""
    slack = max(128, model_vocab_size // 100)
    if tokenizer.vocab_size > model_vocab_size or model_vocab_size - tokenizer.vocab_size > slack:
        raise TokenizerError(
            f"the tokenizer of {where} has {tokenizer.vocab_size} tokens but the model's vocabulary has "
            f"{model_vocab_size}: they do not belong together")


def chat_template_of(model_dir: Path, tok_cfg: dict) -> str | None:
    """`chat_template` of tokenizer_config.json (the "default" one of a named list), else the
    directory's chat_template.jinja."""
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return template if isinstance(template, str) else None


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, OSError) as exc:  # malformed JSON or UTF-8, unreadable
        raise TokenizerError(f"cannot read {path}: {exc}") from None
