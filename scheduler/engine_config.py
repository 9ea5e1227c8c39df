"""What an Engine is built from: the model, where it runs, the KV pool and the batch limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from scheduler.grammar_vocab import DEFAULT_GRAMMAR_CACHE_BYTES, DEFAULT_GRAMMAR_MASK_TIMEOUT

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class EngineConfig:
    """Every setting of an Engine; the server's CLI flags map onto these one to one.

    `model` is a Hugging Face directory, a GGUF file or an installed model's name (None: the
    bundled stories260K). The KV pool holds `num_kv_blocks` blocks when given; otherwise it is
    sized from memory: `kv_cache_memory` bytes on a CPU, `gpu_memory_utilization` of the device
    on a GPU (model/execution/kv_sizing.py). `max_model_len` None takes the model's context. A request
    without its own sink policy gets `attention_sinks` sinks and an `attention_window` recent
    window (None or 0: dense attention). Idle sessions given up under memory pressure move to
    `session_memory` bytes of host blocks (scheduler/sessions.py). Compiled grammars are cached
    up to `grammar_cache_memory` bytes, and a request whose grammar mask takes longer than
    `grammar_mask_timeout` seconds ends (scheduler/structured_output.py). `quantization` is how the
    linear layers are stored (model/quantization/config.py; `auto` decides from the checkpoint
    and the CPU), and with `dtype` "auto" the activations' dtype goes with it.
    """

    model: str | Path | None = None
    device: str = "auto"
    dtype: str | torch.dtype = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int = 1 << 30
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    session_ttl: float = 600.0
    session_memory: int = 1 << 30  # bytes of host memory for idle sessions' K/V (0: none)
    attention_sinks: int = 4
    attention_window: int | None = None
    load_format: str = "auto"
    seed: int = 0
    attention_backend: str | None = None
    enforce_eager: bool = False
    grammar_cache_memory: int = DEFAULT_GRAMMAR_CACHE_BYTES
    grammar_mask_timeout: float = DEFAULT_GRAMMAR_MASK_TIMEOUT
    quantization: str = "none"  # none | auto | int8 | int8-weight | int4-weight (model/quantization/)
    quantization_group_size: int = 32  # int4-weight
    smoothquant_alpha: float | str | None = 0.5  # int8: 0-1, or auto (per layer); None: no smoothing
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; int8: codes and a scale per token and head
