"""`QuantLinear`: a linear layer whose weight is stored quantized, multiplied by the kernel that
measures fastest for each number of rows.

A layer is built empty. The loader hands it its checkpoint tensors part by part (`load_part`:
q, k and v of a stacked qkv projection; gate and up), as float tensors or as the checkpoint's
own codes (`GroupCodes`), then `finish` turns them into weight formats (model/quantization/
formats.py): the method's compact format, and with `batch_dense` a bfloat16 copy too. Which
format serves M rows is measured once per layer shape on this machine (`ROW_BUCKETS`), never
assumed: on the AMX Xeon of BENCHMARKS.md the int4 kernel is 3x float32 at one row and 0.66x
at 64, bfloat16 1.07x and 3.7x. Until `finish`, the layer multiplies by its staged float
weight (SmoothQuant calibration runs then).

The LM head is always int8 weight-only under a quantized method (its 28M parameters are a fifth
of SmolLM2; int8 per channel moved its perplexity by -0.06%, BENCHMARKS.md), with the bfloat16
embedding as its batch copy when the two are tied. A shape a packed kernel cannot take (int4:
N a multiple of 16 and K of the group size; int8: K a multiple of 16) steps down: int4 to int8,
int8 to bfloat16.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from model.quantization.config import QuantizationConfig
from model.quantization.formats import Dense, Int4Groups, Int8Channels, Int8Dynamic, WeightFormat
from model.quantization.weights import GroupCodes, WeightData, as_float

logger = logging.getLogger(__name__)

# Row counts the dispatch is measured at; M rows take the format measured best at the first
# bucket >= M (the last bucket's beyond it).
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_dispatch_cache: dict[tuple, tuple[int, ...]] = {}


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantizationConfig,
                 parts: tuple[int, ...] | None = None, lm_head: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.config = config
        self.parts = parts or (out_features,)  # output rows of each stacked part
        if sum(self.parts) != out_features:
            raise ValueError(f"parts {self.parts} do not add up to {out_features} rows")
        self.lm_head = lm_head
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self._staged: list[WeightData | None] = [None] * len(self.parts)
        self.tied_weight: torch.Tensor | None = None  # the embedding, when the LM head is tied to it
        self.formats: list[WeightFormat] = []
        self._dispatch: tuple[int, ...] = ()  # per ROW_BUCKETS entry: an index into formats
        # Where the model lives (moved with it); formats are built on the CPU and moved there.
        self.register_buffer("device_marker", torch.empty(0), persistent=False)

    # -- loading ------------------------------------------------------------------------------

    def load_part(self, index: int, data: WeightData) -> None:
        rows = self.parts[index]
        if tuple(data.shape) != (rows, self.in_features):
            raise ValueError(f"part {index} has shape {tuple(data.shape)}, expected {(rows, self.in_features)}")
        self._staged[index] = data

    @property
    def loaded(self) -> bool:
        return all(part is not None for part in self._staged) or self.tied_weight is not None

    def staged_weight(self) -> torch.Tensor:
        """The float weight [N, K] as loaded (before `finish`)."""
        if self.tied_weight is not None and self._staged[0] is None:
            return self.tied_weight.float()
        return torch.cat([as_float(part) for part in self._staged])

    def finish(self, smooth: torch.Tensor | None = None) -> None:
        """Build the weight formats from what was loaded, measure which serves how many rows,
        and drop the staged tensors. `smooth`: SmoothQuant factors [K] (int8 only)."""
        method = self.config.method
        source = self._joined()
        shape = (self.out_features, self.in_features)
        if method == "int8" and not self.lm_head:
            compact = Int8Dynamic.from_float(as_float(source), smooth)
        elif method == "int4-weight" and not self.lm_head and Int4Groups.takes(shape, self.config.group_size):
            compact = self._int4(source)
        elif Int8Channels.takes(shape):  # int8-weight, the LM head, and shapes the int4 kernel cannot take
            compact = Int8Channels.from_float(as_float(source))
        else:  # a shape no packed kernel takes (a tiny model's): bfloat16
            compact = Dense(self.tied_weight if self.tied_weight is not None else as_float(source).to(torch.bfloat16))
        formats: list[WeightFormat] = [compact]
        if self.config.batch_dense and not isinstance(compact, (Int8Dynamic, Dense)):
            dense = self.tied_weight if self.tied_weight is not None else as_float(source).to(torch.bfloat16)
            formats.append(Dense(dense))
        self._staged = [None] * len(self.parts)
        device = self.device_marker.device
        self.formats = [f.to(device) for f in formats] if device.type != "cpu" else formats
        self._dispatch = self._measured_dispatch()
        used = sorted(set(self._dispatch))
        if len(used) < len(self.formats):  # a format no row count measured fastest is not kept
            self.formats = [self.formats[i] for i in used]
            self._dispatch = tuple(used.index(i) for i in self._dispatch)

    def _joined(self) -> WeightData:
        """The stacked parts as one weight: codes stay codes when every part has the same kind."""
        parts = self._staged
        if parts[0] is None:  # a tied LM head: the embedding's weight
            return self.tied_weight.float()
        if len(parts) == 1:
            return parts[0]
        if all(isinstance(p, GroupCodes) for p in parts) and len({(p.bits, p.group_size) for p in parts}) == 1:
            return GroupCodes(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                              torch.cat([p.offset for p in parts]), parts[0].bits, parts[0].group_size)
        return torch.cat([as_float(p) for p in parts])

    def _int4(self, source: WeightData) -> Int4Groups:
        group = self.config.group_size
        if isinstance(source, GroupCodes) and source.bits == 4 and source.group_size == group:
            return Int4Groups.from_codes(*source.to_int4(), group)  # the checkpoint's own codes (scales in bf16)
        return Int4Groups.from_float(as_float(source), group)

    # -- running ------------------------------------------------------------------------------

    def _measured_dispatch(self) -> tuple[int, ...]:
        if len(self.formats) == 1:
            return tuple(0 for _ in ROW_BUCKETS)
        key = (tuple((f.name, getattr(f, "weight", torch.empty(0)).dtype, getattr(f, "group_size", 0))
                     for f in self.formats), self.out_features, self.in_features)
        if key not in _dispatch_cache:
            _dispatch_cache[key] = _measure(self.formats, self.in_features)
            logger.debug("dispatch of %s: %s", key, _dispatch_cache[key])
        return _dispatch_cache[key]

    def format_for(self, rows: int) -> WeightFormat:
        for bucket, index in zip(ROW_BUCKETS, self._dispatch):
            if rows <= bucket:
                return self.formats[index]
        return self.formats[self._dispatch[-1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.formats:  # not finished: calibration runs on the float weight
            return F.linear(x, self.staged_weight().to(x.device, x.dtype), self.bias)
        y = self.format_for(x.shape[0]).matmul(x)
        return y + self.bias if self.bias is not None else y

    @property
    def nbytes(self) -> int:
        """Bytes of the weight formats this layer holds (a tied copy is the embedding's)."""
        owned = [f for f in self.formats if not (isinstance(f, Dense) and f.weight is self.tied_weight)]
        return sum(f.nbytes for f in owned)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, formats={[f.name for f in self.formats]}"


@torch.inference_mode()
def _measure(formats: list[WeightFormat], in_features: int) -> tuple[int, ...]:
    """For each row bucket, the index of the fastest format (the median of 3 timings, after a
    warm-up; interleaved), measured as the model runs: without autograd."""
    choice = []
    for rows in ROW_BUCKETS:
        x = torch.randn(rows, in_features).to(torch.bfloat16)
        for fmt in formats:
            fmt.matmul(x)  # warm-up
        runs: list[list[float]] = [[] for _ in formats]
        for _ in range(3):
            for index, fmt in enumerate(formats):
                start = time.perf_counter()
                fmt.matmul(x)
                runs[index].append(time.perf_counter() - start)
        medians = [statistics.median(r) for r in runs]
        choice.append(medians.index(min(medians)))
    return tuple(choice)
