"""SmoothQuant (Xiao et al., ICML 2023) for the `int8` method: a factor per input feature that
moves the activations' outlier channels into the weights before both are quantized to int8.

For a layer with weight W [N, K] and inputs X [*, K]: f_k = max|X_k|^alpha / max|W_:,k|^(1 - alpha);
the layer then computes (X / f) @ (W * f).T, which is X @ W.T exactly before quantization, and
quantizes X / f per token and W * f per output channel. max|X_k| is measured on calibration text
(`model/bundled/calibration.txt`, a public-domain excerpt) by one forward of the model, layer by
layer: each layer's output in that forward is already its W8A8 output, so the layers after it
calibrate on the inputs the quantized model will give them (as GPTQ and AWQ calibrate).

alpha is a flag (`--smoothquant-alpha`, 0.5 by default as in the paper), or `auto`: each layer
takes the alpha of `ALPHA_GRID` whose W8A8 output on its calibration inputs is closest (squared
error) to its float output. Measured (benchmarks/quantization_quality.py, BENCHMARKS.md), against
each model's float32 perplexity: SmolLM2 W8A8 unsmoothed +2.67%, alpha 0.5 +0.89%, auto +0.75%;
stories260K alpha 0.5 +0.29%, auto +1.06%. Neither alpha wins on both, so the default stays the
paper's; calibrating layer by layer (rather than all layers on the float model's activations)
took SmolLM2 from +1.22% to +0.89% at alpha 0.5.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

import torch

from model.layers.attention import AttentionMetadata
from model.quantization.formats import Int8Dynamic
from model.quantization.linear import QuantLinear

logger = logging.getLogger(__name__)

CALIBRATION_TEXT = Path(__file__).resolve().parents[1] / "bundled" / "calibration.txt"
CALIBRATION_TOKENS = 512
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def calibrate(model, token_ids: list[int], alpha: float | str, block_size: int = 16
              ) -> dict[QuantLinear, torch.Tensor]:
    """The smoothing factors [K] (on the CPU, where layers build their formats) of every
    quantized layer but the LM head, from one prefill of the (still float) model over the
    calibration tokens on a cache of its own; alpha a number in [0, 1] or "auto" (searched per
    layer)."""
    factors: dict[QuantLinear, torch.Tensor] = {}
    chosen: list[float] = []

    def record(layer: QuantLinear):
        def hook(_, args, output):
            if layer in factors:
                raise RuntimeError("calibration runs each layer once, over all its tokens")
            x = args[0].detach().float()  # [T, K]
            input_max = x.abs().amax(dim=0)  # [K]
            if alpha == "auto":
                best_alpha, factors[layer] = _best_alpha(layer, x, input_max)
                chosen.append(best_alpha)
            else:
                factors[layer] = smoothing_factors(layer, input_max, float(alpha))
            # What the quantized layer will output: the layers after it calibrate on that.
            fmt = Int8Dynamic.from_float(layer.staged_weight().to(x.device), factors[layer].to(x.device))
            y = fmt.matmul(x)  # [T, N]
            return (y + layer.bias if layer.bias is not None else y).to(output.dtype)
        return hook

    layers = [layer for layer in model.quant_layers() if not layer.lm_head]
    hooks = [layer.register_forward_hook(record(layer)) for layer in layers]
    try:
        device = model.model.embed_tokens.weight.device
        num_blocks = -(-len(token_ids) // block_size)
        kv_caches = model.allocate_kv_cache(num_blocks, block_size)
        meta = AttentionMetadata.build([len(token_ids)], [len(token_ids)], [list(range(num_blocks))], block_size,
                                       device=device)
        with torch.inference_mode():
            model(torch.tensor(token_ids, device=device), meta, kv_caches)
    finally:
        for hook in hooks:
            hook.remove()
    if chosen:
        logger.info("SmoothQuant alphas of %d layers: median %.1f, %.1f to %.1f", len(chosen),
                    statistics.median(chosen), min(chosen), max(chosen))
    return factors


def _best_alpha(layer: QuantLinear, x: torch.Tensor, input_max: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(alpha, factors) of the grid's alpha whose W8A8 output on x [T, K] is closest to the float
    output x @ W.T, computed as the format computes it (Int8Dynamic's own rounding)."""
    weight = layer.staged_weight().to(x.device)  # [N, K]
    expected = x @ weight.T  # [T, N]
    best = None
    for alpha in ALPHA_GRID:
        factors = smoothing_factors(layer, input_max, alpha)  # on the staged weight's device (the CPU)
        output = Int8Dynamic.from_float(weight, factors.to(x.device)).matmul(x)  # [T, N]
        error = float((output - expected).pow(2).sum())
        if best is None or error < best[0]:
            best = (error, alpha, factors)
    return best[1], best[2]


def smoothing_factors(layer: QuantLinear, input_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """f [K] of one layer (features never seen active, or never used by the weight, get 1)."""
    weight_max = layer.staged_weight().abs().amax(dim=0)  # [K]
    input_max = input_max.to(weight_max.device)
    factors = input_max.clamp(min=1e-5).pow(alpha) / weight_max.clamp(min=1e-5).pow(1 - alpha)
    unused = (input_max == 0) | (weight_max == 0)
    return torch.where(unused, torch.ones_like(factors), factors).clamp(min=1e-5)
