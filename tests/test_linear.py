"""model.layers.linear.Linear: oneDNN for CPU float32 matmuls of several rows, F.linear otherwise,
the same numbers either way."""

import pytest
import torch
import torch.nn.functional as F

from model.layers import linear
from model.layers.linear import Linear, onednn_linear_available


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return Linear(96, 200, bias=True)


@pytest.mark.parametrize("min_weight", [0, linear.MIN_ONEDNN_WEIGHT])  # oneDNN, MKL
@pytest.mark.parametrize("rows", [1, 2, 7, 64])
def test_matches_f_linear(layer, rows, min_weight, monkeypatch):
    monkeypatch.setattr(linear, "MIN_ONEDNN_WEIGHT", min_weight)
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        got = layer(x)
    want = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    assert got.shape == (rows, 200) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_several_rows_run_on_onednn(layer, monkeypatch):
    if not onednn_linear_available():
        pytest.skip("this PyTorch build has no oneDNN linear")
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    class Ops:
        @staticmethod
        def _linear_pointwise(*args):
            calls.append(args[0].shape)
            return real(*args)

    monkeypatch.setattr(linear.torch.ops, "mkldnn", Ops)
    with torch.inference_mode():
        layer(torch.randn(5, 96))  # a weight below MIN_ONEDNN_WEIGHT: F.linear
        monkeypatch.setattr(linear, "MIN_ONEDNN_WEIGHT", layer.weight.numel())
        layer(torch.randn(5, 96))
        layer(torch.randn(1, 96))  # one row: F.linear
        Linear(96, 200).double()(torch.randn(5, 96).double())  # not float32: F.linear
    with torch.no_grad():
        layer(torch.randn(3, 96)[:, None].squeeze(1))
    assert calls == [(5, 96), (3, 96)]


def test_autograd_and_odd_inputs_fall_back(layer):
    x = torch.randn(4, 96, requires_grad=True)
    layer(x).sum().backward()  # grad enabled: F.linear, differentiable
    assert x.grad is not None and x.grad.shape == (4, 96)
    with torch.inference_mode():
        batched = layer(torch.randn(2, 3, 96))  # 3-d input
        strided = layer(torch.randn(96, 6).t())  # non-contiguous rows
    assert batched.shape == (2, 3, 200) and strided.shape == (6, 200)
