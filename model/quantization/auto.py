"""`--quantization auto`: how a checkpoint is served, decided from its files and this machine.

- A GGUF whose projection weights are mostly Q4_0 or Q4_1 is served from its own 4-bit codes
  (`int4-weight`, groups of 32: the file's codes, its scales rounded to bfloat16); mostly Q8_0,
  from int8 per channel (`int8-weight`); any other quantized type (the K-quants, Q5, Q6, the IQ
  types) is dequantized and served as `int8-weight` too, requantized per channel (which adds its
  own rounding to the file's: measured on SmolLM2, int8 per channel moved perplexity +0.15%).
  Each with a bfloat16 copy for the row counts where that measures faster (`batch_dense`).
- A float checkpoint (a Hugging Face directory, an F16/F32/BF16 GGUF) stays float: bfloat16 when
  this CPU multiplies the model's largest projection in bfloat16 no slower than in float32 at one
  row and 1.2x faster at 64 (CPUs with AMX or AVX512-BF16 do; measured at startup), else float32.
- On a GPU: none (bfloat16). `int8` and `int8-weight` run there too, on Triton kernels
  (model/kernels/int8_matmul.py) that are tested for correctness but not yet timed on a GPU,
  so `auto` does not pick them; `int4-weight` is the CPU's (PyTorch's CPU int4 pack kernel).
Quantized methods run their activations in bfloat16 (the int4 and int8 pack kernels take
nothing else at speed).
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from model.checkpoints.config import ModelConfig
from model.quantization.config import METHODS, QuantizationConfig

FOUR_BIT = ("Q4_0", "Q4_1")


def gguf_projection_types(path: Path) -> Counter:
    """How many projection weights of each GGML type a GGUF file holds."""
    from model.checkpoints.gguf_checkpoint import open_gguf

    return Counter(tensor.tensor_type.name for tensor in open_gguf(path).tensors
                   if tensor.name.startswith("blk.") and tensor.name.endswith(".weight") and len(tensor.shape) == 2)


def resolve_quantization(method: str, model_path: Path, config: ModelConfig, device: torch.device,
                         dtype: torch.dtype | None, group_size: int, smoothquant_alpha: float | None
                         ) -> tuple[QuantizationConfig, torch.dtype]:
    """(the quantization, the activations' dtype); `dtype` None: the choice is this function's.
    Raises ValueError for a method this device cannot serve."""
    if method == "auto":
        return _auto(model_path, config, device, dtype, group_size, smoothquant_alpha)
    if method not in METHODS:
        raise ValueError(f"quantization {method!r} is not one of auto, {', '.join(METHODS)}")
    quantization = QuantizationConfig(method, group_size, smoothquant_alpha)
    if quantization.quantized and device.type != "cpu":
        if method == "int4-weight" or device.type != "cuda":
            raise ValueError(f"--quantization {method} runs on a CPU; on a GPU use int8, int8-weight, none or auto")
        if importlib.util.find_spec("triton") is None:
            raise ValueError(f"--quantization {method} on a GPU needs triton (its int8 matmul kernels)")
    if dtype is None:
        dtype = torch.bfloat16 if quantization.quantized or device.type == "cuda" else torch.float32
    return quantization, dtype


def _auto(model_path: Path, config: ModelConfig, device: torch.device, dtype: torch.dtype | None,
          group_size: int, smoothquant_alpha: float | None) -> tuple[QuantizationConfig, torch.dtype]:
    if device.type != "cpu":
        return QuantizationConfig(), dtype or torch.bfloat16
    if model_path.suffix.lower() == ".gguf":
        types = gguf_projection_types(model_path)
        quantized = sum(n for name, n in types.items() if name not in ("F32", "F16", "BF16"))
        if quantized * 2 > sum(types.values()):
            four_bit = sum(n for name, n in types.items() if name in FOUR_BIT)
            method = "int4-weight" if four_bit * 2 > sum(types.values()) else "int8-weight"
            return (QuantizationConfig(method, 32 if method == "int4-weight" else group_size, smoothquant_alpha,
                                       batch_dense=True), dtype or torch.bfloat16)
    if dtype is not None:
        return QuantizationConfig(), dtype
    return QuantizationConfig(), torch.bfloat16 if bfloat16_is_faster(config) else torch.float32


def bfloat16_is_faster(config: ModelConfig) -> bool:
    """Whether this CPU multiplies the model's largest projection (gate and up) faster in
    bfloat16 than in float32: no slower at one row and 1.2x faster at 64 (medians of 5)."""
    weight = torch.randn(2 * config.intermediate_size, config.hidden_size) * 0.02

    def seconds(w: torch.Tensor, rows: int) -> float:
        x = torch.randn(rows, config.hidden_size, dtype=w.dtype)
        F.linear(x, w)
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            F.linear(x, w)
            runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    one, many = (seconds(weight, rows) / seconds(weight.bfloat16(), rows) for rows in (1, 64))
    return one >= 1.0 and many >= 1.2  # a clear gain for batches, none lost for one stream
