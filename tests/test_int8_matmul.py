"""The Triton int8 matmuls (model/kernels/int8_matmul.py) against a float64 reference of their
math, and against the CPU formats they stand in for on a GPU (model/quantization/formats.py).

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before anything
imports triton); with CUDA the same tests run on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.triton_device import DEVICE  # before triton is imported: sets up the interpreter

from model.kernels.int8_matmul import int8_matmul
from model.quantization.formats import Int8Channels, Int8Dynamic

# (M, N, K): one row (a decode), ragged tiles in every dimension, several K steps.
SHAPES = [(1, 64, 64), (5, 100, 72), (33, 48, 160), (70, 130, 64)]


def _weight(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) * 0.02 + 1e-3
    return codes, scale


@pytest.mark.parametrize("m, n, k", SHAPES)
def test_w8a8_is_exact_int32_accumulation_then_scales(m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    codes, scale = _weight(n, k, gen)
    x_codes = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    x_scale = torch.rand(m, generator=gen) + 0.1
    out = int8_matmul(x_codes.to(DEVICE), x_scale.to(DEVICE), codes.to(DEVICE), scale.to(DEVICE))
    assert out.shape == (m, n) and out.dtype == torch.float32
    acc = x_codes.double() @ codes.double().T  # [M, N], exact in float64
    expected = acc * x_scale.double()[:, None] * scale.double()[None, :]
    # float32's rounding of the product of three factors, nothing more
    assert torch.allclose(out.cpu().double(), expected, rtol=4 * 2.0 ** -24, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m, n, k", SHAPES[:3])
def test_w8a16_dequantizes_exactly_and_accumulates_in_float32(m, n, k, dtype):
    gen = torch.Generator().manual_seed(m + n * 7 + k)
    codes, scale = _weight(n, k, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    out = int8_matmul(x.to(DEVICE), None, codes.to(DEVICE), scale.to(DEVICE))
    assert out.shape == (m, n) and out.dtype == dtype
    expected = (x.double() @ codes.double().T) * scale.double()[None, :]
    # float32 accumulation of K products, then the output's rounding to dtype
    bound = expected.abs() * torch.finfo(dtype).eps + (x.double().abs() @ codes.double().abs().T) * scale.double() \
        * k * 2.0 ** -23
    assert ((out.cpu().double() - expected).abs() <= bound + 1e-30).all()


def test_the_formats_agree_with_their_cpu_kernels():
    """What a GPU runs for the int8 and int8-weight formats is what PyTorch's CPU kernels compute."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(96, 128, generator=gen) * 0.05
    x = torch.randn(9, 128, generator=gen) * torch.linspace(0.1, 4.0, 128)  # some wide input features
    smooth = torch.rand(128, generator=gen) + 0.5
    w8a8 = Int8Dynamic.from_float(weight, smooth)
    codes, row_scale = Int8Dynamic.quantize_rows(x, smooth)
    out = int8_matmul(codes.to(DEVICE), row_scale.to(DEVICE), w8a8.weights.codes.to(DEVICE),
                      w8a8.weights.scale.to(DEVICE))
    cpu = w8a8.matmul(x)  # torch._int_mm on the same codes
    assert torch.allclose(out.cpu(), cpu, rtol=1e-6, atol=1e-6)

    weight_only = Int8Channels.from_float(weight)
    xb = x.to(torch.bfloat16)
    out = int8_matmul(xb.to(DEVICE), None, weight_only.codes.to(DEVICE), weight_only.scale.to(DEVICE))
    expected = (xb.double() @ weight_only.codes.double().T) * weight_only.scale.double()
    # the CPU kernel rounds its scales to bfloat16; the Triton one keeps them in float32
    assert torch.allclose(out.cpu().double(), expected, rtol=2 ** -7, atol=1e-3)
    assert torch.allclose(weight_only.matmul(xb).double(), expected, rtol=2 ** -6, atol=2e-2)


def test_bad_operands_are_refused():
    codes = torch.zeros(4, 32, dtype=torch.int8, device=DEVICE)
    scale = torch.ones(4, device=DEVICE)
    with pytest.raises(ValueError, match="do not multiply"):
        int8_matmul(torch.zeros(2, 16, device=DEVICE), None, codes, scale)
    with pytest.raises(ValueError, match="W8A8"):
        int8_matmul(torch.zeros(2, 32, device=DEVICE), torch.ones(2, device=DEVICE), codes, scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 16, 256])
def test_full_size_on_gpu(m):
    """A TinyLlama-sized projection (2048 -> 5632) at a decode's and a prefill's row counts."""
    gen = torch.Generator().manual_seed(m)
    codes, scale = _weight(5632, 2048, gen)
    x = torch.randn(m, 2048, generator=gen)
    x_codes, x_scale = Int8Dynamic.quantize_rows(x, None)
    out = int8_matmul(x_codes.cuda(), x_scale.cuda(), codes.cuda(), scale.cuda()).cpu().double()
    expected = (x_codes.double() @ codes.double().T) * x_scale.double()[:, None] * scale.double()
    assert torch.allclose(out, expected, rtol=4 * 2.0 ** -24, atol=0)
    xb = x.to(torch.bfloat16)
    out = int8_matmul(xb.cuda(), None, codes.cuda(), scale.cuda()).cpu().double()
    expected = (xb.double() @ codes.double().T) * scale.double()
    assert ((out - expected).abs() / expected.abs().max()).max() < 2 ** -7
