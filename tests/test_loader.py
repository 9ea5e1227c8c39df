"""Checkpoint formats and the errors a bad model directory gives."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from model.checkpoints.config import ConfigError, ModelConfig
from model.checkpoints.loader import CheckpointError, load_model
from model.checkpoints.model_path import ModelPathError
from model.layers.rotary import rope_inv_freq
from tests.conftest import PagedDriver, max_relative_error, save_hf_checkpoint


def _logits(model, ids=(5, 9, 200, 17, 3, 44)):
    return PagedDriver(model, block_size=4).step({0: list(ids)})[0]


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_sharded_safetensors_and_bin_load_the_same_weights(tmp_path):
    hf = save_hf_checkpoint(tmp_path / "single", seed=3)
    reference = _logits(load_model(tmp_path / "single"))
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    torch.testing.assert_close(_logits(load_model(tmp_path / "sharded")), reference, rtol=0, atol=0)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    torch.save(load_file(tmp_path / "single" / "model.safetensors"), bin_dir / "pytorch_model.bin")
    torch.testing.assert_close(_logits(load_model(bin_dir)), reference, rtol=0, atol=0)


def test_dtype_cast(tmp_path):
    save_hf_checkpoint(tmp_path, seed=4)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.allocate_kv_cache(4, 4)[0][0].dtype == torch.bfloat16
    assert max_relative_error(_logits(model), _logits(load_model(tmp_path))) < 0.05


def test_dummy_load_format_needs_no_weights(tmp_path):
    save_hf_checkpoint(tmp_path, seed=5)
    (tmp_path / "model.safetensors").unlink()
    model = load_model(tmp_path, load_format="dummy")
    assert torch.isfinite(_logits(model)).all()
    assert model.model.layers[0].self_attn.qkv_proj.weight.std() > 0.01
    assert (model.model.norm.weight == 1).all()


def test_missing_weights_file(tmp_path):
    save_hf_checkpoint(tmp_path, seed=6)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors"):
        load_model(tmp_path)


def test_missing_shard(tmp_path):
    hf = save_hf_checkpoint(tmp_path / "a", seed=7)
    hf.save_pretrained(tmp_path / "b", max_shard_size="100KB")
    shard = sorted((tmp_path / "b").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_model(tmp_path / "b")


def test_missing_config(tmp_path):
    with pytest.raises(ModelPathError, match="no config.json"):
        load_model(tmp_path)


def test_wrong_shape_names_file_and_tensor(tmp_path):
    save_hf_checkpoint(tmp_path, seed=8)
    _edit_config(tmp_path, intermediate_size=100)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.mlp.\w+_proj.weight' "
                                              r"has shape \(\d+, \d+\), expected"):
        load_model(tmp_path)


def test_missing_and_unexpected_tensors(tmp_path):
    save_hf_checkpoint(tmp_path, seed=9)
    _edit_config(tmp_path, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match="missing tensors: model.layers.2"):
        load_model(tmp_path)
    _edit_config(tmp_path, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.1"):
        load_model(tmp_path)


def test_unknown_architecture(tmp_path):
    save_hf_checkpoint(tmp_path, seed=10)
    _edit_config(tmp_path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConfigError, match="architectures='GPT2LMHeadModel' is not supported"):
        load_model(tmp_path)


def test_unsupported_rope_type_names_the_field():
    with pytest.raises(ConfigError, match="rope_scaling.rope_type='yarn'"):
        ModelConfig.from_hf_dict(_llama_dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    with pytest.raises(ConfigError, match="rope_scaling.low_freq_factor"):
        ModelConfig.from_hf_dict(_llama_dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}))


def test_mistral_sliding_window_is_refused():
    config = _llama_dict(architectures=["MistralForCausalLM"], sliding_window=64)
    with pytest.raises(ConfigError, match="sliding_window=64"):
        ModelConfig.from_hf_dict(config)
    config["sliding_window"] = None
    assert ModelConfig.from_hf_dict(config).architecture == "MistralForCausalLM"


def _llama_dict(**changes):
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=100, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=128)
    return {**base, **changes}


def test_rope_theta_top_level_or_under_rope_parameters():
    old = ModelConfig.from_hf_dict(_llama_dict(rope_theta=123.0, rope_scaling={"type": "linear", "factor": 2.0}))
    new = ModelConfig.from_hf_dict(_llama_dict(rope_parameters={"rope_theta": 123.0, "rope_type": "linear",
                                                                "factor": 2.0}))
    assert old.rope == new.rope
    assert (new.rope.theta, new.rope.rope_type, new.rope.factor) == (123.0, "linear", 2.0)
    assert ModelConfig.from_hf_dict(_llama_dict()).rope.theta == 10000.0


def test_head_dim_and_kv_heads_defaults():
    config = ModelConfig.from_hf_dict(_llama_dict(num_key_value_heads=None))
    assert (config.num_key_value_heads, config.head_dim) == (4, 8)
    assert ModelConfig.from_hf_dict(_llama_dict(head_dim=16)).head_dim == 16
    with pytest.raises(ConfigError, match="num_key_value_heads=3"):
        ModelConfig.from_hf_dict(_llama_dict(num_key_value_heads=3))


def test_generation_config_stop_ids(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_llama_dict(eos_token_id=2)))
    assert ModelConfig.from_pretrained(tmp_path).eos_token_ids == (2,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    assert ModelConfig.from_pretrained(tmp_path).eos_token_ids == (2, 1)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert ModelConfig.from_pretrained(tmp_path).eos_token_ids == (7,)


def test_rope_frequencies_stay_float32_in_a_bfloat16_model_and_are_checked(tmp_path):
    save_hf_checkpoint(tmp_path, seed=4)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    rotary = model.model.rotary
    assert rotary.inv_freq.dtype == torch.float32
    torch.testing.assert_close(rotary.inv_freq, rope_inv_freq(model.config.rope, model.config.head_dim))
    halved = rotary.inv_freq.double() / 2
    model.set_rope_frequencies(halved)
    assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, halved.float())
    with pytest.raises(ValueError, match="inverse frequencies"):
        model.set_rope_frequencies(torch.ones(model.config.head_dim))
