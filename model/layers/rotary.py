"""Rotary position embeddings (RoPE) with the default, linear and llama3 frequency schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from model.checkpoints.config import RopeConfig


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32, as transformers computes them."""
    # On the CPU even while a model is built on the meta device (where it would take torch's
    # slow reference path); callers move it.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        old_len = rope.original_max_position_embeddings
        low_freq_wavelen = old_len / rope.low_freq_factor
        high_freq_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotates vectors by their positions (the rotate-half layout of Hugging Face checkpoints)."""

    def __init__(self, rope: RopeConfig, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.register_buffer("inv_freq", rope_inv_freq(rope, head_dim), persistent=False)

    def set_inv_freq(self, inv_freq: torch.Tensor) -> None:
        """Rotate by these inverse frequencies [head_dim // 2] from now on, kept in float32 on the
        module's device whatever the model's dtype (a checkpoint's own frequencies, or the
        config's again once a model built on the meta device has memory)."""
        if tuple(inv_freq.shape) != (self.head_dim // 2,):
            raise ValueError(f"inverse frequencies of shape {tuple(inv_freq.shape)}, expected ({self.head_dim // 2},)")
        self.inv_freq = inv_freq.to(device=self.inv_freq.device, dtype=torch.float32)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [*positions.shape, head_dim // 2] for integer positions of any shape.

        The angles are formed in float64: a float32 angle at position p is off by up to p * 2^-24
        radians, 0.06 at a million tokens, and StreamingLLM streams get there.
        """
        freqs = positions.double().unsqueeze(-1) * self.inv_freq.double()  # [..., head_dim // 2]
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [*positions.shape, num_heads, head_dim] rotated by its positions (a new tensor)."""
        return apply_rotary(x, *self.cos_sin(positions, x.dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., num_heads, head_dim] rotated by cos, sin [..., head_dim // 2] (a new tensor).

    Rotate-half layout: with x = [x1, x2] split at head_dim // 2, the result is
    [x1 cos - x2 sin, x2 cos + x1 sin], written half by half without temporaries of x's size.
    """
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [..., 1, head_dim // 2], broadcast over heads
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty_like(x)
    out1, out2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=out1)
    out1.addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=out2)
    out2.addcmul_(x1, sin)
    return out
