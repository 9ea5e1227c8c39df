"""Where a step's model work runs: the `Executor` interface, and the in-process one used today.

The engine hands an executor plain data only (model/execution/model_input.py): a `ModelInput`,
then a `GrammarBitmask`, and gets a `ModelOutput` of lists back; block numbers for the copies of
idle sessions' K/V to and from host memory. Nothing it receives is a live request, a device
tensor or a generator, so a multi-process or multi-GPU executor can ship each message as it is.
Per-request state the model side needs across steps (a seeded request's generator) is kept on
the model side, keyed by request id, and dropped when `ModelInput.finished_request_ids` lists it.

A step takes two calls, as in vLLM v1 (`execute_model`, then `sample_tokens`): the grammar masks
of the step's constrained rows are filled by the engine, which owns the grammars, in a worker
thread started before `execute_model`, and awaited only between the two calls. In process the
forward runs meanwhile on the engine thread (and on a GPU the kernels are only queued), so the
fill stays hidden behind it, as it was when the runner waited on a live mask object; and the
mask reaches the sampler as a plain CPU bitmask, as it would reach another process.

The in-process executor is what vLLM calls a worker: it loads the weights, sizes and allocates the
KV pool and the host blocks for idle sessions, and captures the CUDA graphs.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from model.checkpoints.loader import load_model
from model.execution.host_kv import HostKVPool
from model.execution.kv_sizing import resolve_device, resolve_dtype, size_kv_pool
from model.execution.model_input import GrammarBitmask, ModelInput, ModelOutput
from model.execution.runner import ModelRunner
from model.layers.attention_backend import resolve_backend
from model.checkpoints.config import ModelConfig
from model.quantization.auto import resolve_quantization
from scheduler.engine_config import EngineConfig
from scheduler.startup_stages import StartupStages

logger = logging.getLogger("scheduler.engine")


class Executor(ABC):
    """Runs steps of one model over its KV pool of `num_blocks` blocks, and holds
    `num_host_blocks` host blocks for idle sessions (it is their KV mover, scheduler/sessions.py)."""

    num_blocks: int
    num_host_blocks: int
    device: torch.device
    dtype: torch.dtype

    @abstractmethod
    def execute_model(self, model_input: ModelInput) -> None:
        """Start a step: forget the requests that ended, copy blocks, run the forward."""

    @abstractmethod
    def sample_tokens(self, grammar: GrammarBitmask | None) -> ModelOutput:
        """Finish the step `execute_model` started: sample each row within its grammar's mask."""

    @abstractmethod
    def probe(self, token_id: int) -> None:
        """A short prefill and a decode on scratch blocks; raises if the model side is broken."""

    @abstractmethod
    def save(self, device_blocks: list[int], host_blocks: list[int]) -> None:
        """Copy pool blocks into host blocks (pairwise)."""

    @abstractmethod
    def load(self, host_blocks: list[int], device_blocks: list[int]) -> None:
        """Copy host blocks into pool blocks (pairwise)."""

    @abstractmethod
    def served_as(self) -> dict:
        """How the model is served: quantization, activations' dtype, KV dtype, weight and KV bytes."""


class InProcessExecutor(Executor):
    """The model and its runner in this process, on one device."""

    def __init__(self, config: EngineConfig, model_path: Path, model_cfg: ModelConfig, max_model_len: int,
                 eos_token_ids: tuple[int, ...], stages: StartupStages):
        self.config = config
        self.device = resolve_device(config.device)
        requested = None if config.dtype == "auto" else resolve_dtype(config.dtype, self.device)
        self.quantization, self.dtype = resolve_quantization(
            config.quantization, model_path, model_cfg, self.device, requested,
            config.quantization_group_size, config.smoothquant_alpha)
        logger.info("reading the weights (%s, %s on %s)...", self.quantization.describe(),
                    str(self.dtype).removeprefix("torch."), self.device)
        self.model = load_model(model_path, self.dtype, self.device, config.load_format, config.seed,
                                self.quantization)
        stages.done("weights read%s", " and quantized" if self.quantization.method != "none" else "")
        if config.kv_cache_dtype == "fp8":
            raise ValueError("kv_cache_dtype fp8 is not offered; int8 (a scale per token and head) holds as many "
                             "tokens per GiB on every device")
        if config.kv_cache_dtype not in ("auto", "int8"):
            raise ValueError(f"kv_cache_dtype {config.kv_cache_dtype!r} is not one of auto, int8")
        if config.kv_cache_dtype == "int8":
            self.model.kv_cache_dtype = torch.int8
        self.attention_backend = resolve_backend(config.attention_backend, self.device, model_cfg.head_dim)
        self.model.set_attention_backend(self.attention_backend)
        self.num_blocks = size_kv_pool(self.model, config.block_size, config.num_kv_blocks, config.kv_cache_memory,
                                       config.gpu_memory_utilization, config.max_num_seqs,
                                       config.max_num_batched_tokens, max_model_len)
        self.runner = ModelRunner(self.model, self.num_blocks, config.block_size, eos_token_ids)
        kv_caches = self.runner.kv_caches
        self.num_host_blocks = max(config.session_memory // HostKVPool.bytes_per_block(kv_caches), 0)
        self.host_pool = HostKVPool(kv_caches, self.num_host_blocks) if self.num_host_blocks else None
        stages.done("KV pool allocated: %d blocks of %d tokens (%.1f MiB), %d host blocks for idle sessions",
                    self.num_blocks, config.block_size, self.kv_cache_bytes / 2**20, self.num_host_blocks)
        if self.device.type == "cuda" and self.attention_backend == "triton" and not config.enforce_eager:
            try:
                self.runner.use_decode_graphs(config.max_num_seqs, max_model_len)
                stages.done("CUDA graphs captured for decode steps")
            except Exception:  # a driver or triton that cannot capture: run eagerly rather than not at all
                logger.exception("CUDA graph capture failed; decode steps run eagerly")
                self.runner.decode_graphs = None
                torch.cuda.synchronize(self.device)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.runner.kv_caches)

    def execute_model(self, model_input: ModelInput) -> None:
        self.runner.forget(model_input.finished_request_ids)
        self.runner.execute(model_input)

    def sample_tokens(self, grammar: GrammarBitmask | None) -> ModelOutput:
        return self.runner.sample(grammar)

    def probe(self, token_id: int) -> None:
        self.runner.probe(token_id)

    def save(self, device_blocks: list[int], host_blocks: list[int]) -> None:
        self.host_pool.save(device_blocks, host_blocks)

    def load(self, host_blocks: list[int], device_blocks: list[int]) -> None:
        self.host_pool.load(host_blocks, device_blocks)

    def served_as(self) -> dict:
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        weights += sum(layer.nbytes for layer in self.model.quant_layers())
        dtype = str(self.dtype).removeprefix("torch.")
        kv_cache_dtype = self.config.kv_cache_dtype
        return {"quantization": self.quantization.describe(), "dtype": dtype,
                "kv_cache_dtype": kv_cache_dtype if kv_cache_dtype != "auto" else dtype, "weight_bytes": weights,
                "kv_cache_bytes": self.kv_cache_bytes}
