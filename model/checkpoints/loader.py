"""Build a LlamaForCausalLM and fill it from a checkpoint (or random weights).

A model is a Hugging Face directory (config.json and safetensors) or a GGUF file: a path
ending in `.gguf`, or a directory holding exactly one `.gguf` file and no config.json.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from model.checkpoints.config import ModelConfig
from model.quantization.config import QuantizationConfig
from model.models.llama import LlamaForCausalLM, PartTarget
from model.checkpoints.model_path import checkpoint_files, checkpoint_path
from model.layers.rotary import rope_inv_freq

LOAD_FORMATS = ("auto", "dummy")


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not fit the model; the message names the file and tensor."""


def load_model(
    model_path: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    load_format: str = "auto",
    seed: int = 0,
    quantization: QuantizationConfig | None = None,
) -> LlamaForCausalLM:
    """The model at `model_path` (a HF directory or a .gguf file, see model_path.py; None: the
    bundled stories260K), in eval mode.

    `load_format="dummy"` skips the weight files and fills the model with random weights of
    the right shapes, for benchmarking large shapes without a checkpoint. Under a quantized
    method, the linear layers take their tensors (a GGUF's own codes where they keep them),
    are quantized one by one as their parts arrive (int8 with SmoothQuant: all of them after a
    calibration forward of the float model); no float copy is kept beyond the bfloat16 batch copy
    `auto` may keep.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r} is not one of {LOAD_FORMATS}")
    model_path = checkpoint_path(model_path)
    config = model_config(model_path)
    # Built on the meta device so large models are not initialised twice.
    with torch.device("meta"):
        model = LlamaForCausalLM(config, quantization)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    model.set_rope_frequencies(rope_inv_freq(config.rope, config.head_dim))  # to_empty left the buffer unset
    with torch.no_grad():
        if load_format == "dummy":
            _fill_dummy(model, seed)
        elif model_path.suffix.lower() == ".gguf":
            _load_gguf(model, model_path)
        else:
            _load_checkpoint(model, model_path)
    model.eval().requires_grad_(False)
    if model.quantization.quantized:
        _quantize(model, model_path)
    _return_freed_memory()
    return model


def _return_freed_memory() -> None:
    """Hand the heap pages the load freed back to the OS (glibc keeps them for reuse otherwise:
    60-100 MB of SmolLM2's dequantization and quantization buffers)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _finish_when_loaded(model: LlamaForCausalLM, target: PartTarget) -> None:
    """Quantize a layer as soon as its last part is in, so that the float tensors of one layer
    at a time are held, not the whole model's (int8 with SmoothQuant waits: its calibration
    needs the float model)."""
    config = model.quantization
    if target.layer.loaded and not (config.method == "int8" and config.smoothquant_alpha is not None):
        target.layer.finish()


def _quantize(model: LlamaForCausalLM, model_path: Path) -> None:
    """Calibrate (int8 with SmoothQuant), then build the formats of the layers not built yet."""
    from model.quantization.smoothquant import CALIBRATION_TEXT, CALIBRATION_TOKENS, calibrate
    from model.tokenizers.tokenizer_loader import load_tokenizer

    config = model.quantization
    factors = {}
    if config.method == "int8" and config.smoothquant_alpha is not None:
        tokenizer = load_tokenizer(model_path)
        tokens = tokenizer.encode_text(CALIBRATION_TEXT.read_text())[:CALIBRATION_TOKENS]
        factors = calibrate(model, tokens, config.smoothquant_alpha)
    for layer in model.quant_layers():
        if not layer.formats:
            layer.finish(factors.get(layer))


def model_config(model_path: str | Path | None = None) -> ModelConfig:
    """The config of the model at `model_path` (as load_model takes it), without reading weights."""
    model_path = checkpoint_path(model_path)
    if model_path.suffix.lower() != ".gguf":
        return ModelConfig.from_pretrained(model_path)
    from model.checkpoints.gguf_checkpoint import gguf_model_config, open_gguf  # gguf is needed for GGUF files only

    return gguf_model_config(open_gguf(model_path))


def _fill_dummy(model: LlamaForCausalLM, seed: int) -> None:
    generator = torch.Generator(device=model.model.embed_tokens.weight.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02, generator=generator)
    for target in model.checkpoint_tensors().values():
        if isinstance(target, PartTarget):
            shape = (target.layer.parts[target.index], target.layer.in_features)
            target.layer.load_part(target.index, torch.empty(shape).normal_(0.0, 0.02, generator=generator))
            _finish_when_loaded(model, target)


def _read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        yield from state.items()


def _load_checkpoint(model: LlamaForCausalLM, model_dir: Path) -> None:
    params = model.checkpoint_tensors()
    loaded: set[str] = set()
    for path in checkpoint_files(model_dir):
        for name, tensor in _read_tensors(path):
            if name.endswith("rotary_emb.inv_freq"):
                continue  # derived from the config, saved by old checkpoints
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue  # tied to the embedding
            target = _checked_target(params, model.config, path.name, name, tensor, "config.json")
            if isinstance(target, PartTarget):
                target.layer.load_part(target.index, tensor)
                _finish_when_loaded(model, target)
            else:
                target.copy_(tensor.to(target.dtype))
            loaded.add(name)
    _check_complete(params, loaded, f"checkpoint in {model_dir}")


def _load_gguf(model: LlamaForCausalLM, gguf_file: Path) -> None:
    from model.checkpoints.gguf_checkpoint import INV_FREQ, gguf_tensors, open_gguf, release_gguf

    params = model.checkpoint_tensors()
    loaded: set[str] = set()
    keep_codes = model.quantization.quantized
    for name, tensor in gguf_tensors(open_gguf(gguf_file), model.config, keep_codes):
        if name == INV_FREQ:  # a file with rope_freqs.weight (Llama 3.1-style frequencies); shape checked there
            model.set_rope_frequencies(tensor)
            continue
        target = _checked_target(params, model.config, gguf_file.name, name, tensor, "the GGUF metadata")
        if isinstance(target, PartTarget):
            target.layer.load_part(target.index, tensor)
            _finish_when_loaded(model, target)
        elif isinstance(target, torch.nn.Parameter) and tensor.dtype == target.dtype and tensor.device == target.device:
            target.data = tensor  # freshly dequantized: adopting it spares a copy into untouched memory
        else:
            target.copy_(tensor)
        loaded.add(name)
    _check_complete(params, loaded, gguf_file.name)
    release_gguf()  # the weights own their memory: the file's map can go (the tokenizer came first)


def _checked_target(targets: dict[str, torch.Tensor], config: ModelConfig, file_name: str, name: str,
                    tensor: torch.Tensor, config_source: str) -> torch.Tensor:
    """The model tensor that checkpoint tensor `name` fills, once its name and shape are checked."""
    if name not in targets:
        raise CheckpointError(f"{file_name}: unexpected tensor {name!r} for {config.architecture}")
    target = targets[name]
    if tuple(tensor.shape) != tuple(target.shape):  # a PartTarget's shape is its part's
        raise CheckpointError(
            f"{file_name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
            f"expected {tuple(target.shape)} from {config_source}"
        )
    return target


def _check_complete(params: Iterable[str], loaded: set[str], checkpoint: str) -> None:
    missing = sorted(set(params) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{checkpoint} is missing tensors: {shown}")
