"""Tokenizer and streaming detokenizer against the bundled stories260K SentencePiece model."""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest
import sentencepiece as spm

from model.tokenizers.sentencepiece_tokenizer import SentencePieceDetokenizer, SentencePieceTokenizer
from model.tokenizers.tokenizer import TokenizerError

MODEL_DIR = Path(__file__).parents[1] / "model/bundled/stories260K"
BYTE0 = 3  # <0x00> is id 3, so byte b is id b + 3
BOS, EOS, UNK = 1, 2, 0


def byte_ids(data: bytes) -> list[int]:
    return [BYTE0 + b for b in data]


@pytest.fixture(scope="module")
def tok() -> SentencePieceTokenizer:
    return SentencePieceTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(MODEL_DIR / "tokenizer.model"))


def stream(tok, prompt, output, rng=None):
    """Push `output` in chunks (one token each, or random sizes); return the deltas incl. flush."""
    detok = SentencePieceDetokenizer(tok, prompt)
    deltas, i = [], 0
    while i < len(output):
        k = rng.randint(1, 5) if rng else 1
        deltas.append(detok.push(output[i:i + k]))
        i += k
    deltas.append(detok.flush())
    return deltas


# --- loading and special tokens ------------------------------------------------------------

def test_bundled_settings(tok):
    assert tok.vocab_size == 512
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS)
    assert tok.add_bos_token is True and tok.add_eos_token is False
    assert tok.chat_template is None
    assert tok.id_to_piece(BOS) == "<s>" and tok.id_to_piece(BYTE0 + 0xE4) == "<0xE4>"


def test_encode_bos_handling(tok, sp):
    plain = sp.encode("Once upon a time")
    assert tok.encode("Once upon a time") == [BOS] + plain  # add_bos_token from the config
    assert tok.encode("Once upon a time", add_bos=False) == plain
    assert tok.encode("Once upon a time", add_bos=True) == [BOS] + plain
    assert tok.encode("") == [BOS]


def copy_model(tmp_path: Path, **files) -> Path:
    shutil.copy(MODEL_DIR / "tokenizer.model", tmp_path / "tokenizer.model")
    for name, content in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    return tmp_path


def test_special_tokens_from_tokenizer_config_strings_and_dicts(tmp_path):
    # Deliberately swapped, so the ids can only have come from this file.
    d = copy_model(tmp_path, tokenizer_config={
        "bos_token": {"content": "</s>", "lstrip": False}, "eos_token": "<s>",
        "add_bos_token": False, "add_eos_token": True, "chat_template": "{{ messages }}",
    }, config={"bos_token_id": 7, "eos_token_id": 8})
    tok = SentencePieceTokenizer.from_pretrained(str(d))
    assert (tok.bos_token_id, tok.eos_token_id) == (EOS, BOS)
    assert tok.add_bos_token is False and tok.chat_template == "{{ messages }}"
    assert tok.encode("hi") == tok.sp.encode("hi") + [BOS]  # add_eos_token appends "eos"
    assert tok.encode("hi", add_bos=True)[0] == EOS


def test_special_tokens_fall_back_to_config_json_then_model(tmp_path):
    # A token string the model does not know falls through to config.json.
    d = copy_model(tmp_path, tokenizer_config={"bos_token": "<nope>"},
                   config={"bos_token_id": 5, "eos_token_id": [2, 1]})
    tok = SentencePieceTokenizer.from_pretrained(d)
    assert (tok.bos_token_id, tok.eos_token_id) == (5, 2)
    assert tok.add_bos_token is True  # the LLaMA default when the config is silent

    (d / "tokenizer_config.json").unlink()
    (d / "config.json").unlink()
    tok = SentencePieceTokenizer.from_pretrained(d)
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS)  # SentencePiece's own


def test_missing_tokenizer_model_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.model") as err:
        SentencePieceTokenizer.from_pretrained(tmp_path)
    assert str(tmp_path / "tokenizer.model") in str(err.value)


# --- encode / decode -----------------------------------------------------------------------

ROUND_TRIP = [
    "Once upon a time, there was a little girl named Lily.",
    "你好，世界",
    "🎉🚀 party 👩‍👩‍👧 time",  # includes a ZWJ emoji sequence
    "Mixed: English, 中文, русский, العربية, हिन्दी, 日本語かな, ελληνικά",
    "tabs\tand\nnewlines\r\nand\u00a0no-break\u00a0spaces",
    "line one\n\nline three\n",
    "\u3000ideographic space and \u200a hair space",
    "é vs e\u0301",  # precomposed and combining: the model keeps them as they are
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, sp, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids) == sp.decode(ids)


def test_byte_fallback_is_used_for_unknown_characters(tok):
    ids = tok.encode("你好，世界 🎉", add_bos=False)
    assert sum(BYTE0 <= i < BYTE0 + 256 for i in ids) >= 12
    assert tok.decode(ids) == "你好，世界 🎉"


def test_whitespace_is_normalised_not_round_tripped(tok):
    # The model's normalizer has remove_extra_whitespaces: runs of spaces collapse to one and
    # leading/trailing spaces are dropped before tokenising, so these do NOT round-trip.
    # Other whitespace (tabs, newlines, NBSP) is kept, as test_round_trip shows.
    assert tok.decode(tok.encode("a  b   c")) == "a b c"
    assert tok.decode(tok.encode("  leading")) == "leading"
    assert tok.decode(tok.encode("trailing  ")) == "trailing"
    # A leading space is absorbed by the dummy prefix: " there" and "there" are one token.
    assert tok.encode(" there", add_bos=False) == tok.encode("there", add_bos=False) == [383]


def test_decode_special_tokens(tok):
    ids = [BOS] + tok.encode("Once", add_bos=False) + [EOS]
    assert tok.decode(ids) == "Once"
    assert tok.decode(ids, skip_special_tokens=False) == "<s> Once</s>"


def test_token_bytes_table(tok, sp):
    assert tok.token_bytes(383) == b" there"  # "▁there"
    assert tok.token_bytes(BYTE0 + 0xE4) == b"\xe4"
    assert tok.token_bytes(BYTE0) == b"\x00"
    assert tok.token_bytes(BOS) == tok.token_bytes(EOS) == b""
    assert tok.token_bytes(UNK) == sp.decode([UNK]).encode()


def test_invalid_bytes_decode_like_sentencepiece(tok, sp):
    # SentencePiece gives every byte that does not start a valid character its own U+FFFD;
    # Python's errors="replace" gives one per maximal invalid subsequence. We follow
    # SentencePiece in decode() and streaming alike.
    ids = byte_ids(b"\xe4\xbdA")
    assert b"\xe4\xbdA".decode("utf-8", errors="replace") == "\ufffdA"
    assert sp.decode(ids) == tok.decode(ids) == "\ufffd\ufffdA"
    assert "".join(stream(tok, [], ids)) == "\ufffd\ufffdA"
    # A non-byte token (even an invisible one) ends a byte run: no character spans it.
    ids = byte_ids(b"\xe4\xbd") + [BOS] + byte_ids(b"\xa0")
    assert sp.decode(ids) == "".join(stream(tok, [], ids)) == "\ufffd" * 3


# --- incremental detokenization ------------------------------------------------------------

def test_first_token_space_after_prompt_and_at_start(tok):
    prompt = tok.encode("Once upon a time")
    assert stream(tok, prompt, [383]) == [" there", ""]
    # With nothing decoded before it, the dummy-prefix space goes, as in decode().
    assert "".join(stream(tok, [], [383])) == tok.decode([383]) == "there"
    assert "".join(stream(tok, [BOS], [383])) == "there"


def test_stream_chinese_and_emoji_by_bytes(tok):
    text = "你好，世界 🎉"
    for prompt, output in [([], tok.encode(text, add_bos=False)),
                           ([BOS], tok.encode(text, add_bos=False))]:
        deltas = stream(tok, prompt, output)
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == text
    # A character's bytes are held until the last one arrives.
    detok = SentencePieceDetokenizer(tok, [BOS])
    assert [detok.push([i]) for i in byte_ids("🎉".encode())] == ["", "", "", "🎉"]


def expected_text(tok, prompt, output):
    full, head = tok.decode(prompt + output), tok.decode(prompt)
    if not prompt:
        return full
    return full[len(head):] if full.startswith(head) else None


@pytest.mark.parametrize("with_prompt", [False, True])
def test_random_streams_match_full_decode(tok, with_prompt):
    rng = random.Random(1234 + with_prompt)
    checked = 0
    for _ in range(600):
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 30) * with_prompt)]
        output = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 60))]
        deltas = stream(tok, prompt, output, rng)
        for d in deltas:
            d.encode("utf-8")  # strict: a lone surrogate or similar fragment would raise
        expected = expected_text(tok, prompt, output)
        if expected is not None:
            assert "".join(deltas) == expected, (prompt, output)
            checked += 1
    assert checked > 550


@pytest.mark.parametrize("seed", range(3))
def test_random_streams_dense_in_bytes_and_controls(tok, seed):
    # Uniform ids are half byte pieces; this biases further towards the awkward cases:
    # multi-byte leads and continuations, control tokens, unk and the lone "▁" (410).
    rng = random.Random(seed)
    pool = byte_ids(bytes(range(0x80, 0x100))) + byte_ids(b"A ") + [UNK, BOS, EOS, 410, 383]
    for _ in range(400):
        prompt = [rng.choice(pool) for _ in range(rng.choice([0, rng.randint(1, 8)]))]
        output = [rng.choice(pool) for _ in range(rng.randint(0, 25))]
        expected = expected_text(tok, prompt, output)
        if expected is not None:
            assert "".join(stream(tok, prompt, output, rng)) == expected, (prompt, output)


def random_char(rng) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF)]
    lo, hi = rng.choice(ranges)
    return chr(rng.randint(lo, hi))


def test_valid_characters_split_into_bytes_never_show_replacement(tok):
    rng = random.Random(7)
    for _ in range(300):
        text = "".join(random_char(rng) for _ in range(rng.randint(1, 20)))
        prompt = rng.choice([[], [BOS], tok.encode("Once upon a time")])
        deltas = stream(tok, prompt, byte_ids(text.encode()), rng)
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == text


def test_prompt_ending_mid_character(tok):
    head = tok.encode("x")
    # The output finishes the character: decode(prompt) ("x\ufffd\ufffd") is no prefix of the
    # full text, and the stream gives the whole character.
    assert "".join(stream(tok, head + byte_ids(b"\xe4\xbd"), byte_ids(b"\xa0"))) == "你"
    # The output breaks it: the prompt's U+FFFDs are not repeated.
    prompt, output = head + byte_ids(b"\xe4\xbd"), tok.encode("there", add_bos=False)
    assert "".join(stream(tok, prompt, output)) == expected_text(tok, prompt, output) == " there"


@pytest.mark.parametrize("add_dummy_prefix", [True, False])
@pytest.mark.parametrize("remove_extra_whitespaces", [True, False])
def test_other_normalizer_settings(tmp_path, add_dummy_prefix, remove_extra_whitespaces):
    # The bundled model collapses whitespace; LLaMA 2's keeps it (only one dummy-prefix "▁"
    # is stripped on decode). Train tiny models (milliseconds) to cover every combination.
    corpus = ["Once upon a time there was a little girl named Lily.",
              "She liked to play  with her   dog in the park."] * 50
    with open(tmp_path / "tokenizer.model", "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=f, vocab_size=300, model_type="bpe",
            byte_fallback=True, hard_vocab_limit=False, minloglevel=2,
            add_dummy_prefix=add_dummy_prefix, remove_extra_whitespaces=remove_extra_whitespaces)
    tok = SentencePieceTokenizer.from_pretrained(tmp_path)
    sp = tok.sp
    lone = sp.piece_to_id("\u2581")
    assert sp.id_to_piece(lone) == "\u2581"
    if not remove_extra_whitespaces:
        assert tok.decode(tok.encode("  two  spaces ")) == "  two  spaces "

    rng = random.Random(0)
    # Lone "▁" pieces at the start are what the settings disagree about: weight them up.
    pool = list(range(tok.vocab_size)) + [lone] * 40 + [UNK, BOS, EOS] * 10
    for _ in range(1000):
        prompt = [rng.choice(pool) for _ in range(rng.choice([0, rng.randint(1, 5)]))]
        output = [rng.choice(pool) for _ in range(rng.randint(0, 12))]
        expected = expected_text(tok, prompt, output)
        if expected is not None:
            assert "".join(stream(tok, prompt, output, rng)) == expected, (prompt, output)


def test_out_of_range_id(tok):
    with pytest.raises(ValueError):
        SentencePieceDetokenizer(tok, []).push([tok.vocab_size])


class _NoDecode:
    """Stands in for the SentencePiece processor while streaming: any decode call fails."""

    def __init__(self, sp):
        self._sp = sp

    def __getattr__(self, name):
        if "decode" in name.lower():
            raise AssertionError(f"streaming called sp.{name}")
        return getattr(self._sp, name)


def test_streaming_is_constant_time_per_token(tok, monkeypatch):
    # Re-decoding the whole sequence per token would be quadratic: minutes for 100k tokens.
    monkeypatch.setattr(tok, "sp", _NoDecode(tok.sp))
    rng = random.Random(0)
    output = [rng.randrange(tok.vocab_size) for _ in range(100_000)]
    detok = SentencePieceDetokenizer(tok, [BOS])
    start = time.perf_counter()
    text = "".join(detok.push([i]) for i in output) + detok.flush()
    elapsed = time.perf_counter() - start
    monkeypatch.undo()
    assert text == tok.decode([BOS] + output)
    assert elapsed < 5.0
