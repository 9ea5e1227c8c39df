"""`Linear`: nn.Linear whose CPU float32 matmuls of several rows run on oneDNN instead of MKL.

PyTorch sends a CPU float32 `F.linear` to MKL's sgemm. On the AVX2 EPYC that the CPU benchmarks
run on (one thread), oneDNN's matmul on the same dense weights runs the 12 layers' projections of
the 76M shape 1.04-1.14x faster at 8 rows, 1.08-1.25x at 64 and 1.09-1.12x at 256 (three runs):
weights that stream from memory. At one row (a memory-bound read of the weights) oneDNN is
0.88-1.03x MKL's speed, and on small weights, which stay in the cache, 0.37-0.97x (about 50 us
more per call). So oneDNN gets the matmuls of several rows with a weight of at least
MIN_ONEDNN_WEIGHT elements, MKL the rest. BENCHMARKS.md has the measurements
(`benchmarks/cpu_levers.py`: `matmul`, `matmul-small`). The weight stays an ordinary dense
parameter: nothing is repacked, checkpoints load by name as before, and memory is unchanged.

oneDNN is reached through `torch.ops.mkldnn._linear_pointwise`, the op PyTorch's own compiler
emits for CPU linears; a build without it (or one where it fails once) falls back to `F.linear`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn


logger = logging.getLogger(__name__)

_onednn_usable: bool | None = None  # None: not probed yet

# Weights of fewer elements (4 MiB in float32) stay on MKL: they sit in the cache across a
# forward, where MKL is faster, and oneDNN's per-call cost would dominate a tiny model's step.
MIN_ONEDNN_WEIGHT = 1 << 20


def onednn_linear_available() -> bool:
    """Whether this PyTorch build runs `_linear_pointwise` (probed once, on a tiny matmul)."""
    global _onednn_usable
    if _onednn_usable is None:
        _onednn_usable = False
        if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            try:
                x, w = torch.ones(2, 3), torch.ones(4, 3)
                with torch.inference_mode():
                    y = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
                _onednn_usable = bool(torch.equal(y, F.linear(x, w)))
            except Exception:  # an op this build lacks or rejects: MKL it is
                logger.debug("oneDNN linear unavailable", exc_info=True)
    return _onednn_usable


def dense_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, on oneDNN for CPU float32 matmuls of several rows with a large weight."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[0] > 1
            and weight.numel() >= MIN_ONEDNN_WEIGHT and not torch.is_grad_enabled()
            and onednn_linear_available()):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_matmul(x, self.weight, self.bias)
