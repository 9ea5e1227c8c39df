"""A Hugging Face `tokenizers.Tokenizer` built from the tokenizer a GGUF file describes.

A GGUF carries no `tokenizer.json`: it stores the vocabulary, the merges or scores, each token's
type and the special ids as metadata, under llama.cpp's keys. `tokenizer.ggml.model` names the
algorithm and `tokenizer.ggml.pre` the regex split in front of it; both are rebuilt here the way
llama.cpp (src/llama-vocab.cpp) and transformers' GGUF conversion read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from model.tokenizers.tokenizer import TokenizerError

_KEYS = gguf.Keys.Tokenizer
_SPACE = "\u2581"  # SentencePiece's "▁" word-boundary marker

# The regexes of llama.cpp's `LLAMA_VOCAB_PRE_TYPE_*` splits, spelled as in the models'
# tokenizer.json where llama.cpp runs a rewritten equivalent (its engine has no `(?i:...)`).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")


_LLAMA3_NAMES = "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano"


def _names(names: str, splits: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    return dict.fromkeys(names.split(), splits)


# `tokenizer.ggml.pre` -> the regexes llama.cpp splits with, applied one after the other: each
# cuts every piece further, its matches and the text between them both kept.
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": _DEFAULT,
    **_names("gpt-2 phi-2 mpt olmo jais exaone4", (_GPT2,)),
    **_names("smollm starcoder refact command-r codeshell exaone minerva-7b", (r"\p{N}", _GPT2)),
    **_names(f"{_LLAMA3_NAMES} dbrx smaug-bpe", (_LLAMA3,)),
    **_names("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2", (_QWEN2,)),
    "qwen35": (_QWEN35,),
    "tekken": (_TEKKEN,),
    **_names("gpt-4o llama4 kanana2 talkie minimax-m2", (_GPT4O,)),
}
# The pre-tokenizers for which llama.cpp sets `ignore_merges` (a word found whole in the
# vocabulary is one token, merges or not) and adds BOS when the file does not say.
_LLAMA3_LIKE = frozenset(f"{_LLAMA3_NAMES} tekken".split())


# Control tokens that end a generation whatever the file's eos/eot ids say, by their text, as
# llama.cpp reads them (src/llama-vocab.cpp): most files name only one of a model's stop tokens.
END_OF_GENERATION = frozenset([
    "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<EOT>", "_<EOT>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>",
])


class UnsupportedGGUFTokenizer(TokenizerError):
    """The file names a tokenizer model or a pre-tokenizer this module cannot rebuild."""


@dataclass(frozen=True)
class GGUFTokenizer:
    """The tokenizer of a GGUF file: a `tokenizers` backend and the settings around it.

    Control tokens (and the named special ids) are special added tokens of the backend, matched
    whole in text and skipped by `decode(..., skip_special_tokens=True)`; user-defined tokens are
    added tokens that are not special. `backend.encode(text)` adds BOS/EOS as the flags say;
    `add_special_tokens=False` gives the text's tokens alone.
    """

    backend: Tokenizer
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None
    end_of_generation_ids: tuple[int, ...] = ()  # control tokens llama.cpp stops at by their text

    def __post_init__(self):
        if self.add_bos_token and self.bos_token_id is None:
            raise TokenizerError(f"{_KEYS.ADD_BOS} is true, but the file has no {_KEYS.BOS_ID}.")
        if self.add_eos_token and self.eos_token_id is None:
            raise TokenizerError(f"{_KEYS.ADD_EOS} is true, but the file has no {_KEYS.EOS_ID}.")


def tokenizer_from_gguf(reader: gguf.GGUFReader) -> GGUFTokenizer:
    """Build the tokenizer the metadata of `reader` describes."""
    model = _value(reader, _KEYS.MODEL)
    if model not in ("gpt2", "llama"):
        raise UnsupportedGGUFTokenizer(
            f"Cannot build a tokenizer for {_KEYS.MODEL} = {model!r}; supported: 'gpt2', 'llama'."
        )
    tokens = _value(reader, _KEYS.LIST)
    if tokens is None:
        raise UnsupportedGGUFTokenizer(f"The GGUF file has no vocabulary ({_KEYS.LIST}).")
    token_types = _value(reader, _KEYS.TOKEN_TYPE) or [gguf.TokenType.NORMAL] * len(tokens)
    id_keys = (_KEYS.BOS_ID, _KEYS.EOS_ID, _KEYS.UNK_ID, _KEYS.PAD_ID)
    bos, eos, unk, pad = (_value(reader, key) for key in id_keys)

    if model == "gpt2":
        pre = _value(reader, _KEYS.PRE) or "default"  # llama.cpp's fallback, with a warning
        backend = _byte_level_backend(tokens, _value(reader, _KEYS.MERGES) or [], pre)
        add_bos_by_default = pre in _LLAMA3_LIKE
    else:
        backend = _sentencepiece_backend(reader, tokens, None if unk is None else tokens[unk])
        add_bos_by_default = True  # llama.cpp's default for a SentencePiece vocabulary
    _add_tokens(backend, tokens, token_types, {bos, eos, unk, pad} - {None})

    tokenizer = GGUFTokenizer(
        backend=backend,
        bos_token_id=bos,
        eos_token_id=eos,
        unk_token_id=unk,
        pad_token_id=pad,
        add_bos_token=bool(_value(reader, _KEYS.ADD_BOS, add_bos_by_default and bos is not None)),
        add_eos_token=bool(_value(reader, _KEYS.ADD_EOS, False)),
        chat_template=_value(reader, _KEYS.CHAT_TEMPLATE),
        end_of_generation_ids=tuple(i for i, (token, kind) in enumerate(zip(tokens, token_types))
                                    if token in END_OF_GENERATION and kind == gguf.TokenType.CONTROL),
    )
    backend.post_processor = _bos_eos_template(tokenizer, tokens)
    return tokenizer


def _value(reader: gguf.GGUFReader, key: str, default=None):
    """A metadata value as Python data: a string array as `list[str]`, a number array as a list."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _byte_level_backend(tokens: list[str], merges: list[str], pre: str) -> Tokenizer:
    """GPT-2 style byte-level BPE: tokens are spelled in GPT-2's byte alphabet, text is split by
    the `pre` regexes, then mapped to that alphabet and merged. Control and user-defined tokens
    are stored as plain text; they stay so, since they are matched in the text as it is."""
    if pre not in PRE_TOKENIZER_SPLITS:
        raise UnsupportedGGUFTokenizer(
            f"Cannot build a tokenizer for {_KEYS.PRE} = {pre!r}: its split is not known here. "
            f"Known: {', '.join(sorted(PRE_TOKENIZER_SPLITS))}."
        )
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(
        vocab, [tuple(merge.split(" ", 1)) for merge in merges], ignore_merges=pre in _LLAMA3_LIKE,
    ))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        *(pre_tokenizers.Split(Regex(split), behavior="isolated") for split in PRE_TOKENIZER_SPLITS[pre]),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(reader: gguf.GGUFReader, tokens: list[str], unk_token: str | None) -> Tokenizer:
    """SentencePiece BPE as transformers' `LlamaTokenizer` runs it: spaces become "▁" (and one is
    put in front of the text when `add_space_prefix`), pieces are merged best score first, and a
    character outside the vocabulary falls back to its `<0xNN>` byte tokens."""
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = _value(reader, _KEYS.MERGES)
    if merges is not None:
        merge_pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    else:
        scores = _value(reader, _KEYS.SCORES)
        if scores is None:
            raise UnsupportedGGUFTokenizer(f"A 'llama' vocabulary needs {_KEYS.SCORES} or {_KEYS.MERGES}.")
        merge_pairs = _merges_by_score(vocab, dict(zip(tokens, scores)))
    backend = Tokenizer(models.BPE(vocab, merge_pairs, unk_token=unk_token, fuse_unk=True, byte_fallback=True))
    add_space_prefix = bool(_value(reader, _KEYS.ADD_PREFIX, True))  # llama.cpp's default for this model
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPACE, prepend_scheme="first" if add_space_prefix else "never", split=False,
    )
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_by_score(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a scored vocabulary: every split of a token into two tokens, best
    score first (longer left part first on a tie), as transformers' `generate_merges` orders them."""
    merges = []
    for token, score in scores.items():
        splits = [(token[:cut], token[cut:]) for cut in range(1, len(token))]
        found = [(left, right) for left, right in splits if left in vocab and right in vocab]
        found.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges.extend((left, right, score) for left, right in found)
    merges.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_tokens(backend: Tokenizer, tokens: list[str], token_types: list[int], special_ids: set) -> None:
    """Control and unknown tokens, and the ids named BOS/EOS/UNK/PAD, become special added tokens;
    user-defined ones plain added tokens. Both are matched whole in text before any split, as
    llama.cpp does; they keep their ids since each is already in the vocabulary."""
    special_types = (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN)
    special, user_defined = [], []
    for index, (token, token_type) in enumerate(zip(tokens, token_types)):
        if token_type in special_types or index in special_ids:
            special.append(AddedToken(token, special=True, normalized=False))
        elif token_type == gguf.TokenType.USER_DEFINED:
            user_defined.append(AddedToken(token, special=False, normalized=False))
    backend.add_special_tokens(special)
    backend.add_tokens(user_defined)


def _bos_eos_template(tokenizer: GGUFTokenizer, tokens: list[str]) -> processors.TemplateProcessing:
    """`$A` between the BOS and EOS the flags ask for; a pair is joined the same way."""
    before = [tokens[tokenizer.bos_token_id]] if tokenizer.add_bos_token else []
    after = [tokens[tokenizer.eos_token_id]] if tokenizer.add_eos_token else []
    ids = {tokens[i]: i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None}
    return processors.TemplateProcessing(
        single=[*before, "$A", *after],
        pair=[*before, "$A", *after, *before, "$B:1", *after],
        special_tokens=[(token, ids[token]) for token in {*before, *after}],
    )
