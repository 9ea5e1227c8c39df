"""Where a test module's Triton kernels run: import `DEVICE` from here before anything imports
triton.

With CUDA, on the GPU. Without it, in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1,
set here unless the environment says otherwise; it must be set before triton is first
imported). The importing module is skipped where triton is missing, or where there is no GPU and
the interpreter was turned off.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)
