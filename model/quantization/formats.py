"""Weight formats of a linear layer, each with the matmul that reads it as it is stored.

A format holds one weight [N, K] (out x in features) and computes `x @ W.T` for activations
x [M, K]:

- `Dense`: the weight in a float dtype (float32 through `model.linear`'s MKL/oneDNN choice,
  or bfloat16, which CPUs with AMX or AVX512-BF16 multiply several times faster).
- `Int4Groups`: 4-bit codes q in groups of `group_size` input features, each group with a
  scale s and an offset z: w = (q - 8) * s + z (llama.cpp's Q4_0 and Q4_1 blocks are this: Q4_0
  z = 0, Q4_1 z = m + 8d; the kernel takes s and z in bfloat16, so a file's float16 d and m are
  rounded). PyTorch's int4 pack matmul, bfloat16 activations.
- `Int8Channels`: int8 codes with one scale per output channel, w = q * s; weight-only (the
  activations stay bfloat16): PyTorch's int8 pack matmul (on a GPU, a Triton kernel,
  model/kernels/int8_matmul.py).
- `Int8Dynamic`: the same weights, and activations quantized to int8 per token at run time
  (W8A8): x = p * t per row, y = (p @ q.T) * t * s, an int8 x int8 -> int32 matmul
  (`torch._int_mm`: AMX or VNNI on a CPU that has them; on a GPU the Triton kernel, its scales
  fused); an optional SmoothQuant factor f per
  input feature divides x and multiplies the weight's columns before they are quantized.

Everything here is exact about its own math; tests check each against a float64 reference of
it (tests/test_quantization.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from model.layers.linear import dense_matmul

INT8_MAX = 127


class WeightFormat:
    """A weight in one storage format and the matmul over it."""

    name: str

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N], in x's dtype."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    def to(self, device: torch.device) -> WeightFormat:
        """The same format with its tensors on `device`."""
        def moved(value):
            return value.to(device) if isinstance(value, (torch.Tensor, WeightFormat)) else value
        return dataclasses.replace(self, **{f.name: moved(getattr(self, f.name)) for f in dataclasses.fields(self)})


@dataclass
class Dense(WeightFormat):
    weight: torch.Tensor  # [N, K]
    name = "dense"

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:
            return dense_matmul(x.to(self.weight.dtype), self.weight).to(x.dtype)
        return dense_matmul(x, self.weight)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


@dataclass
class Int4Groups(WeightFormat):
    packed: torch.Tensor  # PyTorch's int4 pack layout of the codes [N, K] (uint8 [N, K / 2] on a CPU)
    scales_and_zeros: torch.Tensor  # [K / group_size, N, 2] bfloat16: (s, z) per group
    group_size: int
    shape: tuple[int, int]  # (N, K)
    name = "int4"

    @staticmethod
    def takes(shape: tuple[int, int], group_size: int) -> bool:
        """Whether the int4 pack kernel takes a weight of this shape (N a multiple of 16, K of
        the group size)."""
        n, k = shape
        return n % 16 == 0 and k % group_size == 0

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int
                   ) -> Int4Groups:
        """codes [N, K] in 0..15, scale and offset [N, K / group_size]: w = (q - 8) * s + z."""
        n, k = codes.shape
        if k % group_size or group_size not in (32, 64, 128, 256):
            raise ValueError(f"int4 groups of {group_size} do not divide {k} input features (or are not 32-256)")
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        scales_and_zeros = torch.stack([scale.t(), offset.t()], dim=-1).to(torch.bfloat16).contiguous()  # [G, N, 2]
        return cls(packed, scales_and_zeros, group_size, (n, k))

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int) -> Int4Groups:
        """Asymmetric groups: each group's min and max span the 16 codes."""
        n, k = weight.shape
        groups = weight.float().reshape(n, k // group_size, group_size)  # [N, G, g]
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [N, G]
        scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        codes = ((groups - low[..., None]) / scale[..., None]).round_().clamp_(0, 15)
        return cls.from_codes(codes.reshape(n, k), scale, low + 8 * scale, group_size)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16).contiguous(), self.packed, self.group_size, self.scales_and_zeros)
        return y.to(x.dtype)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_and_zeros.numel() * 2


@dataclass
class Int8Channels(WeightFormat):
    codes: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N] float32
    name = "int8"

    @staticmethod
    def takes(shape: tuple[int, int]) -> bool:
        """Whether the int8 pack kernel takes a weight of this shape: PyTorch 2.13's reads past a
        row (and crashes the process) for more than one row when K is not a multiple of 16."""
        return shape[1] % 16 == 0

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Channels:
        """Symmetric per output channel: s = max |w| / 127."""
        scale = weight.float().abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / INT8_MAX  # [N]
        codes = (weight.float() / scale[:, None]).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        return cls(codes, scale)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from model.kernels.int8_matmul import int8_matmul
            return int8_matmul(x, None, self.codes, self.scale)
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.codes, self.scale.to(torch.bfloat16))
        return y.to(x.dtype)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scale.numel() * 4


@dataclass
class Int8Dynamic(WeightFormat):
    """W8A8: the weight's int8 codes per output channel, the activations' per token."""

    weights: Int8Channels  # of the weight times the smoothing factor (columns)
    smooth: torch.Tensor | None = None  # [K] float32: x / smooth meets weight * smooth; None: 1
    name = "w8a8"

    @classmethod
    def from_float(cls, weight: torch.Tensor, smooth: torch.Tensor | None = None) -> Int8Dynamic:
        scaled = weight.float() * smooth if smooth is not None else weight
        return cls(Int8Channels.from_float(scaled), smooth)

    @staticmethod
    def quantize_rows(x: torch.Tensor, smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [M, K] (divided by smooth) -> its codes [M, K] int8 and their scale [M] float32."""
        xf = x.float()
        if smooth is not None:
            xf = xf / smooth
        row_scale = xf.abs().amax(dim=1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny) / INT8_MAX  # [M, 1]
        codes = (xf / row_scale).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)  # [M, K]
        return codes, row_scale.squeeze(1)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        codes, row_scale = self.quantize_rows(x, self.smooth)
        if x.is_cuda:
            from model.kernels.int8_matmul import int8_matmul
            return int8_matmul(codes, row_scale, self.weights.codes, self.weights.scale, out_dtype=x.dtype)
        acc = torch._int_mm(codes, self.weights.codes.t())  # [M, N] int32
        return (acc.float() * row_scale[:, None] * self.weights.scale).to(x.dtype)

    @property
    def nbytes(self) -> int:
        return self.weights.nbytes + (self.smooth.numel() * 4 if self.smooth is not None else 0)


def dequantize(fmt: WeightFormat) -> torch.Tensor:
    """The float32 weight [N, K] a format stands for (an int4 weight's codes are packed away:
    its source is dequantized instead, `model/quantization/weights.py`)."""
    if isinstance(fmt, Dense):
        return fmt.weight.float()
    if isinstance(fmt, Int8Channels):
        return fmt.codes.float() * fmt.scale[:, None]
    if isinstance(fmt, Int8Dynamic):
        weight = dequantize(fmt.weights)
        return weight / fmt.smooth if fmt.smooth is not None else weight
    raise TypeError(f"{type(fmt).__name__} cannot be dequantized")
