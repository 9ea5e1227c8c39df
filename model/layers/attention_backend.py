"""Which implementation of paged attention a model runs: the PyTorch reference or Triton kernels.

- `torch`: `model/layers/attention.py`, pure PyTorch, any device; the oracle the kernels are tested
  against.
- `triton`: `model/kernels/`, fused paged-attention kernels; the default on a CUDA GPU when
  triton imports and the head dim is a power of two >= 16. On a CPU it runs only in Triton's
  interpreter (TRITON_INTERPRET=1), which tests use.

`auto` picks `triton` on CUDA where it can and `torch` everywhere else. The choice comes from
the engine's `attention_backend` option (`--attention-backend` on the server), or else from the
SINKSERVE_ATTENTION_BACKEND environment variable.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

from model.layers.attention import AttentionMetadata, paged_attention, write_kv

BACKENDS = ("auto", "torch", "triton")

# (q, q_sink, k_cache, v_cache, meta, scale) -> out: see model/layers/attention.py.
AttentionFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, AttentionMetadata, float],
                       torch.Tensor]
WriteKVFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def resolve_backend(requested: str | None, device: torch.device, head_dim: int) -> str:
    """`torch` or `triton` for a request of auto/torch/triton (None: the environment, else auto)."""
    requested = requested or os.environ.get("SINKSERVE_ATTENTION_BACKEND", "auto")
    if requested not in BACKENDS:
        raise ValueError(f"attention backend {requested!r} is not one of {', '.join(BACKENDS)}")
    triton_ok, why_not = _triton_usable(device, head_dim)
    if requested == "triton" and not triton_ok:
        raise ValueError(f"the triton attention backend cannot run here: {why_not}")
    if requested == "auto":
        return "triton" if triton_ok and device.type == "cuda" else "torch"
    return requested


def attention_functions(backend: str) -> tuple[WriteKVFn, AttentionFn]:
    """(write_kv, paged_attention) of a resolved backend."""
    if backend == "triton":
        from model.kernels import paged_attention_triton, write_kv_triton
        return write_kv_triton, paged_attention_triton
    return write_kv, paged_attention


def _triton_usable(device: torch.device, head_dim: int) -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "on a CPU it needs TRITON_INTERPRET=1 (interpreter mode, for tests)"
    if device.type not in ("cpu", "cuda"):
        return False, f"device {device.type} is not supported"
    if head_dim < 16 or head_dim & (head_dim - 1):
        return False, f"head_dim {head_dim} is not a power of two >= 16"
    return True, ""
