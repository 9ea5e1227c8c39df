"""Triton kernels: the GPU fast path of paged attention (model/kernels/paged_attention.py) and
the int8 matmuls of quantized layers on a GPU (model/kernels/int8_matmul.py, imported by
model/quantization/formats.py where a weight lives on a GPU).

`paged_attention_triton` and `write_kv_triton` take the same arguments and give the same results
as the PyTorch reference `model.layers.attention.paged_attention` / `write_kv`. Importing this package
imports triton; nothing else in the repository imports it, so a CPU install without triton
still works. On a CPU, set TRITON_INTERPRET=1 before triton is first imported to run the
kernels in Triton's interpreter (slow; for tests).
"""

from model.kernels.paged_attention import paged_attention_triton
from model.kernels.write_kv import write_kv_triton

__all__ = ["paged_attention_triton", "write_kv_triton"]
