"""How a model's linear layers are stored and multiplied (`--quantization`).

- `none`: float weights in the serving dtype (the default of the Python API).
- `int8`: W8A8, int8 weights per output channel and activations quantized per token at run
  time, SmoothQuant-smoothed (`smoothquant_alpha`: a number, or "auto" to search it per layer;
  None: not smoothed) on calibration text.
- `int8-weight`: int8 weights per output channel, bfloat16 activations.
- `int4-weight`: 4-bit weights in groups of `group_size` input features, bfloat16 activations;
  a GGUF's Q4_0 and Q4_1 blocks (groups of 32) are taken as they are.
- `auto` (the server's default) is resolved per checkpoint and machine by `resolve_quantization`
  (model/quantization/auto.py) into one of the above, with `batch_dense` set where a bfloat16
  copy multiplies many rows faster than the compact weights (measured at load).
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("none", "int8", "int8-weight", "int4-weight")
CHOICES = ("auto", *METHODS)
DEFAULT_GROUP_SIZE = 32
DEFAULT_SMOOTHQUANT_ALPHA = 0.5


@dataclass(frozen=True)
class QuantizationConfig:
    method: str = "none"
    group_size: int = DEFAULT_GROUP_SIZE  # int4-weight
    smoothquant_alpha: float | str | None = DEFAULT_SMOOTHQUANT_ALPHA  # int8: "auto" or [0, 1]; None: no smoothing
    # Keep a bfloat16 copy of a compact weight as well, for the row counts where it measures
    # faster (auto only: it costs 2 bytes a parameter).
    batch_dense: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"quantization {self.method!r} is not one of {', '.join(CHOICES)}")
        if self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"int4 group size {self.group_size} is not one of 32, 64, 128, 256")
        alpha = self.smoothquant_alpha
        if alpha is not None and alpha != "auto" and not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"smoothquant alpha {alpha!r} is not auto or a number in [0, 1]")

    @property
    def quantized(self) -> bool:
        return self.method != "none"

    def describe(self) -> str:
        """What is served, in a few words (the model card and the startup log)."""
        if self.method == "none":
            return "none"
        detail = {"int4-weight": f"groups of {self.group_size}", "int8-weight": "per channel",
                  "int8": f"per channel, activations per token, SmoothQuant alpha {self.smoothquant_alpha}"
                  if self.smoothquant_alpha is not None else "per channel, activations per token"}[self.method]
        return f"{self.method} ({detail}{', bfloat16 for batches where faster' if self.batch_dense else ''})"
