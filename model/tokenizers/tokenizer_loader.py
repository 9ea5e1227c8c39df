"""The tokenizer a checkpoint carries, loaded: `load_tokenizer(path)`.

A GGUF file's own vocabulary (model/tokenizers/gguf_tokenizer.py, through Hugging Face `tokenizers`), a
directory's `tokenizer.json` (model/tokenizers/hf_tokenizer.py), or its SentencePiece `tokenizer.model`
(model/tokenizers/sentencepiece_tokenizer.py), in that order. The implementations import only their base
(model/tokenizers/tokenizer.py), and this module imports them: no import circle.
"""

from __future__ import annotations

from pathlib import Path

from model.tokenizers.hf_tokenizer import HFTokenizer
from model.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer
from model.tokenizers.tokenizer import Tokenizer, TokenizerError


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a Hugging Face directory or a GGUF file."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return HFTokenizer.from_gguf(path)
    if (path / "tokenizer.json").is_file():
        return HFTokenizer.from_pretrained(path)
    if (path / "tokenizer.model").is_file():
        return SentencePieceTokenizer.from_pretrained(path)
    raise TokenizerError(f"no tokenizer in {path}: expected tokenizer.json or tokenizer.model")
