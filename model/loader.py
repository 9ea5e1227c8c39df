"""Build a LlamaForCausalLM and fill it from a Hugging Face checkpoint (or random weights)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from model.config import ModelConfig
from model.llama import LlamaForCausalLM
from model.rotary import rope_inv_freq

BUNDLED_MODEL_DIR = Path(__file__).parent / "bundled" / "stories260K"
LOAD_FORMATS = ("auto", "dummy")


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not fit the model; the message names the file and tensor."""


def load_model(
    model_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    load_format: str = "auto",
    seed: int = 0,
) -> LlamaForCausalLM:
    """The model in `model_dir` (the bundled stories260K when None), in eval mode.

    `load_format="dummy"` skips the weight files and fills the model with random weights of
    the right shapes, for benchmarking large shapes without a checkpoint.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r} is not one of {LOAD_FORMATS}")
    model_dir = Path(model_dir) if model_dir is not None else BUNDLED_MODEL_DIR
    config = ModelConfig.from_pretrained(model_dir)
    # Built on the meta device so large models are not initialised twice.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    model.model.rotary.inv_freq = rope_inv_freq(config.rope, config.head_dim).to(device)
    with torch.no_grad():
        if load_format == "dummy":
            _fill_dummy(model, seed)
        else:
            _load_checkpoint(model, model_dir)
    return model.eval().requires_grad_(False)


def _fill_dummy(model: LlamaForCausalLM, seed: int) -> None:
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02, generator=generator)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files of a Hugging Face model directory, in load order."""
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_dir / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [model_dir / shard for shard in shards]
            for file in files:
                if not file.is_file():
                    raise FileNotFoundError(f"{index_name} lists {file.name}, which is missing from {model_dir}")
            return files
    bin_file = model_dir / "pytorch_model.bin"
    if bin_file.is_file():
        return [bin_file]
    raise FileNotFoundError(
        f"no weights in {model_dir}: expected model.safetensors, model.safetensors.index.json "
        "with its shards, or pytorch_model.bin"
    )


def _read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        yield from state.items()


def _load_checkpoint(model: LlamaForCausalLM, model_dir: Path) -> None:
    params = dict(model.named_parameters())  # a tied lm_head appears once, as the embedding
    loaded: set[str] = set()
    for path in checkpoint_files(model_dir):
        for name, tensor in _read_tensors(path):
            if name.endswith("rotary_emb.inv_freq"):
                continue  # derived from the config, saved by old checkpoints
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue  # tied to the embedding
            if name not in params:
                raise CheckpointError(f"{path.name}: unexpected tensor {name!r} for {model.config.architecture}")
            param = params[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{path.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(param.shape)} from config.json"
                )
            param.copy_(tensor.to(param.dtype))
            loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint in {model_dir} is missing tensors: {shown}")
