"""What a loader hands a linear layer: a float tensor, or a quantized one in groups as the
checkpoint stores it (GGUF's Q4_0, Q4_1 and Q8_0 blocks), kept as codes so that a layer that
stores the same codes takes them as they are, with no loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GroupCodes:
    """A weight [N, K] as codes in groups of `group_size` input features: w = q * s + m per group.

    Q4_0: 4-bit q, s = d, m = -8 d; Q4_1: 4-bit q, s = d, m = m; Q8_0: 8-bit signed q, s = d, m = 0.
    """

    codes: torch.Tensor  # [N, K]: uint8 0..15 (4 bits) or int8 (8 bits)
    scale: torch.Tensor  # [N, K / group_size] float32
    offset: torch.Tensor  # [N, K / group_size] float32
    bits: int
    group_size: int

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] (exact: what the checkpoint's dequantization gives)."""
        n, k = self.codes.shape
        groups = self.codes.float().reshape(n, k // self.group_size, self.group_size)  # [N, G, g]
        return (groups * self.scale[..., None] + self.offset[..., None]).reshape(n, k)

    def rows(self, index: torch.Tensor) -> GroupCodes:
        """The same weight with its rows reordered (llama.cpp's q/k row permutation undone)."""
        return GroupCodes(self.codes[index], self.scale[index], self.offset[index], self.bits, self.group_size)

    def to_int4(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes 0..15, s, z) for the int4 kernel's w = (q - 8) * s + z; 4-bit codes only."""
        if self.bits != 4:
            raise ValueError("only 4-bit codes map onto the int4 kernel")
        return self.codes, self.scale, self.offset + 8 * self.scale


WeightData = torch.Tensor | GroupCodes


def as_float(data: WeightData) -> torch.Tensor:
    return data.dequantize() if isinstance(data, GroupCodes) else data.float()
