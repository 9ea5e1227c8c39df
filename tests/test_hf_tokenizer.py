"""Hugging Face tokenizer.json checkpoints: encode/decode, special tokens, chat templates and
streaming, against transformers' tokenizer over the same file.

Two tokenizer.json kinds are built here with the `tokenizers` library: a byte-level BPE
(GPT-2 / Llama 3 / SmolLM2 style, trained on a small Unicode corpus) and the bundled
SentencePiece model converted to tokenizer.json (Metaspace, byte fallback, as transformers
converts Llama 2 tokenizers).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, normalizers, pre_tokenizers, trainers

from model.tokenizers.hf_tokenizer import ByteLevelDetokenizer, HFTokenizer, WindowDetokenizer
from model.checkpoints.model_path import BUNDLED_MODEL_DIR
from model.sampling_params import SamplingParams
from model.tokenizers.tokenizer import Tokenizer, TokenizerError, check_vocab_size
from model.tokenizers.tokenizer_loader import load_tokenizer
from scheduler.output_processor import OutputProcessor
from scheduler.request import Request
from server.chat_template import ChatTemplate

EXAMPLES = int(os.environ.get("SINKSERVE_UNICODE_EXAMPLES", "300"))
checked = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                   suppress_health_check=list(HealthCheck))

CORPUS = [
    "Once upon a time, there was a little girl named Lily.",
    "你好，世界。日本語のかなとカナ、한국어 문장.",
    "🎉🚀 party 👩‍👩‍👧 time 🇫🇷🇯🇵 👍🏽",
    "é vs e\u0301, n\u0303, a\u0308\u0301 combining marks",
    "Arabic العربية and Hebrew עברית, right to left",
    "  lone spaces,   runs of spaces,\ttabs\t\tand\nnewlines\n\n\r\nCRLF ",
    "digits 1234567 and 3.14159, contractions: don't, I'm, we'll, they've",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # code\n",
    "\u3000ideographic space, \u00a0no-break space, \u200bzero width",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief. 简短"}, {"role": "user", "content": "Hi 👋"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "don't stop <|im_end|> now"}],
]


def _byte_level_dir(path: Path) -> Path:
    """A byte-level BPE checkpoint's tokenizer files: trained here, with ChatML specials."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS * 3, trainer)
    path.mkdir()
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "chat_template": CHATML, "clean_up_tokenization_spaces": False}))
    return path


def _sentencepiece_dir(path: Path) -> Path:
    """The bundled SentencePiece model as a tokenizer.json: BPE with byte fallback, merges
    ordered by the merged piece's score (what transformers' LlamaConverter writes)."""
    sp = spm.SentencePieceProcessor(model_file=str(BUNDLED_MODEL_DIR / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    merges = []
    for piece, i in vocab.items():
        if sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i):
            continue
        merges += [(piece[:k], piece[k:], sp.get_score(i)) for k in range(1, len(piece))
                   if piece[:k] in vocab and piece[k:] in vocab]
    merges.sort(key=lambda m: (-m[2], vocab[m[0]], vocab[m[1]]))
    backend = Backend(models.BPE(vocab, [(a, b) for a, b, _ in merges], unk_token="<unk>",
                                 byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    path.mkdir()
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "add_bos_token": True}))
    return path


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory) -> Path:
    return _byte_level_dir(tmp_path_factory.mktemp("tok") / "byte_level")


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory) -> Path:
    return _sentencepiece_dir(tmp_path_factory.mktemp("tok") / "sentencepiece")


@pytest.fixture(scope="module")
def hf_reference(byte_level_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(byte_level_dir)


def test_tokenizer_json_is_chosen_over_tokenizer_model(tmp_path, byte_level_dir):
    both = tmp_path / "both"
    shutil.copytree(byte_level_dir, both)
    shutil.copy(BUNDLED_MODEL_DIR / "tokenizer.model", both)
    assert isinstance(load_tokenizer(both), HFTokenizer)
    (both / "tokenizer.json").unlink()
    assert not isinstance(load_tokenizer(both), HFTokenizer)
    (both / "tokenizer.model").unlink()
    with pytest.raises(TokenizerError, match="tokenizer.json or tokenizer.model"):
        load_tokenizer(both)


@pytest.mark.parametrize("text", CORPUS + SPECIALS + [f"a {s} b{s}c" for s in SPECIALS])
def test_byte_level_encode_decode_equal_transformers(byte_level_dir, hf_reference, text):
    tok = load_tokenizer(byte_level_dir)
    ids = tok.encode(text)
    assert ids == hf_reference(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=False) == hf_reference.decode(ids) == text
    assert tok.decode(ids) == hf_reference.decode(ids, skip_special_tokens=True)


def test_byte_level_special_tokens(byte_level_dir, hf_reference):
    tok = load_tokenizer(byte_level_dir)
    assert tok.vocab_size == len(hf_reference)
    assert (tok.bos_token_id, tok.eos_token_id) == (hf_reference.bos_token_id, hf_reference.eos_token_id)
    assert not tok.add_bos_token  # the post-processor adds nothing, and neither do we
    for special in SPECIALS:
        (i,) = tok.encode(special)
        assert tok.id_to_piece(i) == special and tok.token_bytes(i) == special.encode()
        assert tok.decode([i]) == "" and tok.decode([i], skip_special_tokens=False) == special


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(byte_level_dir, hf_reference, messages, add_generation_prompt):
    tok = load_tokenizer(byte_level_dir)
    template = ChatTemplate(tok)
    expected = hf_reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert template.render(messages, add_generation_prompt) == expected
    assert template.encode(messages, add_generation_prompt) == hf_reference(
        expected, add_special_tokens=False)["input_ids"]


def test_chat_template_jinja_file(tmp_path, byte_level_dir):
    model = tmp_path / "model"
    shutil.copytree(byte_level_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert ChatTemplate(load_tokenizer(model)).render([{"role": "user", "content": "x"}]) == "[x]"


def test_post_processor_bos_is_followed(tmp_path, byte_level_dir):
    """Llama 3's tokenizer.json adds <|begin_of_text|> in its post-processor, with no
    add_bos_token in tokenizer_config.json."""
    from tokenizers import processors

    model = tmp_path / "model"
    shutil.copytree(byte_level_dir, model)
    backend = Backend.from_file(str(model / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                           special_tokens=[("<|endoftext|>", 0)])
    backend.save(str(model / "tokenizer.json"))
    (model / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>"}))
    tok = load_tokenizer(model)
    assert tok.add_bos_token and tok.encode("hi")[0] == 0 and tok.encode("hi", add_bos=False)[0] != 0


def test_sentencepiece_tokenizer_json_matches_sentencepiece(sentencepiece_dir):
    tok = load_tokenizer(sentencepiece_dir)
    sp = spm.SentencePieceProcessor(model_file=str(BUNDLED_MODEL_DIR / "tokenizer.model"))
    assert isinstance(tok, HFTokenizer) and not tok.byte_level
    assert tok.vocab_size == sp.vocab_size() and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    for text in CORPUS[:5]:
        assert tok.encode(text) == [1] + sp.encode(text)
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))


def test_vocab_size_must_fit_the_model(byte_level_dir):
    tok = load_tokenizer(byte_level_dir)
    check_vocab_size(tok, tok.vocab_size + 64, "m")  # padded embedding rows: fine
    with pytest.raises(TokenizerError, match="49152"):
        check_vocab_size(tok, 49152, "m")
    with pytest.raises(TokenizerError, match=str(tok.vocab_size)):
        check_vocab_size(tok, tok.vocab_size - 1, "m")
    size = tok.vocab_size
    tok.pad_vocab(size + 64)
    detok = tok.detokenizer()
    assert detok.push([size + 3]) + detok.flush() == "" and tok.decode([size + 3, 5]) == tok.decode([5])


# --- streaming ------------------------------------------------------------------------------

def _stream(tok: Tokenizer, prompt: list[int], output: list[int], chunks: list[int], skip: bool) -> list[str]:
    detok = tok.detokenizer(prompt, skip_special_tokens=skip)
    deltas, i = [], 0
    for size in chunks:
        deltas.append(detok.push(output[i:i + size]))
        i += size
    return deltas + [detok.push(output[i:]), detok.flush()]


def _check_any_ids(tok: Tokenizer, data) -> None:
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1) | st.integers(0, 300), max_size=14), label="ids")
    split = data.draw(st.integers(0, len(ids)), label="prompt length")
    chunks = data.draw(st.lists(st.integers(1, 3), max_size=6), label="chunks")
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    prompt, output = ids[:split], ids[split:]
    full, before = tok.decode(ids, skip), tok.decode(prompt, skip)
    if full.startswith(before):  # else decode(prompt) is no prefix: nothing to compare with
        assert "".join(_stream(tok, prompt, output, chunks, skip)) == full[len(before):]


def _check_text(tok: Tokenizer, text: str, data) -> None:
    ids = tok.encode(text, add_bos=False)
    split = data.draw(st.integers(0, len(ids)), label="prompt length")
    chunks = data.draw(st.lists(st.integers(1, 3), max_size=8), label="chunks")
    deltas = _stream(tok, ids[:split], ids[split:], chunks, True)
    full, before = tok.decode(ids), tok.decode(ids[:split])
    if not full.startswith(before):
        return  # the prompt ends inside a character, which decode(prompt) shows as U+FFFD
    assert "".join(deltas) == full[len(before):]
    if "\ufffd" not in text:
        assert not any("\ufffd" in d for d in deltas), deltas  # no half character ever leaks


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30) | st.sampled_from(CORPUS)


KINDS = pytest.mark.parametrize("kind, detokenizer", [("byte_level", ByteLevelDetokenizer),
                                                      ("sentencepiece", WindowDetokenizer)])


@KINDS
@checked
@given(data=st.data())
def test_stream_of_any_ids_equals_decode(request, kind, detokenizer, data):
    tok = _cached(request.getfixturevalue(f"{kind}_dir"))
    assert isinstance(tok.detokenizer(), detokenizer)
    _check_any_ids(tok, data)


@KINDS
@checked
@given(text=TEXT, data=st.data())
def test_stream_of_text_never_splits_a_character(request, kind, detokenizer, text, data):
    _check_text(_cached(request.getfixturevalue(f"{kind}_dir")), text, data)


_TOKENIZERS: dict[Path, Tokenizer] = {}


def _cached(path: Path) -> Tokenizer:
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = load_tokenizer(path)
    return _TOKENIZERS[path]


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_stop_strings_over_split_characters(request, kind):
    """A stop string made of a character split over byte tokens still stops the stream, and
    the text before it comes out whole."""
    tok = _cached(request.getfixturevalue(f"{kind}_dir"))
    text = "hello 你好🎉 world"
    ids = tok.encode(text, add_bos=False)
    processor = OutputProcessor(tok, (), max_model_len=1000)
    req = Request("r", [tok.bos_token_id or 0], SamplingParams(temperature=0, max_tokens=50, stop=["🎉"]))
    processor.add(req)
    texts = []
    for i in ids:
        out = processor.process_token(req, i, None)
        texts.append(out.text)
        if out.finished:
            break
    assert out.finished and out.finish_reason == "stop" and out.stop_reason == "🎉"
    assert "".join(texts) == "hello 你好"


def test_random_byte_level_sequences_match_decode(byte_level_dir):
    """A seeded sweep beside hypothesis: byte tokens of split characters, invalid sequences
    and surrogate-range bytes (ED A0..BF, which Rust and Python both replace byte by byte)."""
    tok = _cached(byte_level_dir)
    rng = random.Random(0)
    for _ in range(2000):
        ids = [rng.randrange(tok.vocab_size) if rng.random() < 0.5 else rng.randrange(300)
               for _ in range(rng.randint(0, 12))]
        split = rng.randint(0, len(ids))
        full, before = tok.decode(ids), tok.decode(ids[:split])
        if full.startswith(before):
            assert "".join(_stream(tok, ids[:split], ids[split:], [1] * len(ids), True)) == full[len(before):], ids


def test_engine_serves_a_tokenizer_json_checkpoint_with_an_eos_list(tmp_path, byte_level_dir):
    """A Llama 3-style directory: tokenizer.json, no tokenizer.model, two stop ids in
    generation_config.json; generation stops at either."""
    from scheduler.engine import Engine
    from tests.conftest import save_hf_checkpoint

    vocab = _cached(byte_level_dir).vocab_size
    save_hf_checkpoint(tmp_path, seed=3, vocab_size=vocab)
    (tmp_path / "tokenizer.model").unlink()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(byte_level_dir / name, tmp_path / name)
    engine = Engine(tmp_path, device="cpu", num_kv_blocks=64)
    assert isinstance(engine.tokenizer, HFTokenizer)
    free = engine.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                           use_tqdm=False)[0]
    first, second = free.token_ids[5], free.token_ids[9]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [second, first]}))
    engine = Engine(tmp_path, device="cpu", num_kv_blocks=64)
    stopped = engine.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=24),
                              use_tqdm=False)[0].completions[0]
    end = min(free.token_ids.index(first), free.token_ids.index(second))
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:end + 1]
    assert stopped.text == engine.tokenizer.decode(free.token_ids[:end])


def test_sentencepiece_json_token_bytes_keep_spaces_and_bytes(sentencepiece_dir):
    """What logprobs report for a token: "▁the" is " the", "<0xE4>" is the byte."""
    tok = _cached(sentencepiece_dir)
    sp = spm.SentencePieceProcessor(model_file=str(BUNDLED_MODEL_DIR / "tokenizer.model"))
    (there,) = sp.encode("there")  # the piece "▁there"
    assert tok.token_bytes(there) == b" there"
    assert tok.token_bytes(sp.piece_to_id("<0xE4>")) == b"\xe4"
    assert tok.token_bytes(1) == b"<s>"


def test_window_detokenizer_after_a_prompt_of_special_tokens(sentencepiece_dir):
    """The window reaches back past skipped special tokens, so the output's leading space stays."""
    tok = _cached(sentencepiece_dir)
    hello, world = tok.encode("hello", add_bos=False), tok.encode("world", add_bos=False)
    prompt = hello + [1] * 8
    detok = tok.detokenizer(prompt)
    streamed = detok.push(world) + detok.flush()
    assert streamed == tok.decode(prompt + world)[len(tok.decode(prompt)):] == " world"


def test_generation_blocks_render_as_their_body(byte_level_dir):
    template = ChatTemplate(_cached(byte_level_dir), "{% for m in messages %}{% if m.role == 'assistant' %}"
                            "{% generation %}[{{ m.content }}]{% endgeneration %}{% else %}{{ m.content }}"
                            "{% endif %}{% endfor %}")
    assert template.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == "a[b]"


def test_engine_stops_at_the_tokenizers_eos(tmp_path, byte_level_dir):
    """A ChatML fine-tune whose config.json names another EOS than its tokenizer_config.json:
    both stop a generation."""
    from scheduler.engine import Engine
    from tests.conftest import save_hf_checkpoint

    tok = _cached(byte_level_dir)
    save_hf_checkpoint(tmp_path, seed=4, vocab_size=tok.vocab_size, eos_token_id=0)
    (tmp_path / "tokenizer.model").unlink()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(byte_level_dir / name, tmp_path / name)
    assert Engine(tmp_path, device="cpu", num_kv_blocks=16).stop_token_ids == (0, tok.encode("<|im_end|>")[0])
