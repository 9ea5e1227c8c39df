"""Host blocks for idle sessions' K/V: the tier below the device pool (scheduler/sessions.py).

One K and one V tensor per layer, `[num_blocks, block_size, num_kv_heads, head_dim]` like the
pool's, in host memory: pinned on a GPU, so that the copies run at full bus speed; on a CPU
they are a second allocation beside the pool, whose pages the OS commits only when a session
is first written there. Copies are synchronous and run on the engine thread between steps, so
no step ever reads a block while it is being filled or emptied.
"""

from __future__ import annotations

import torch

from model.models.llama import KVCache


class HostKVPool:
    def __init__(self, kv_caches: KVCache, num_blocks: int):
        self.kv_caches = kv_caches
        k_cache = kv_caches[0][0]
        self.device = k_cache.device
        shape = (num_blocks, *k_cache.shape[1:])
        pin = self.device.type == "cuda"
        self.host_caches = [
            (torch.empty(shape, dtype=k_cache.dtype, pin_memory=pin), torch.empty(shape, dtype=k_cache.dtype,
                                                                                   pin_memory=pin))
            for _ in kv_caches
        ]

    @staticmethod
    def bytes_per_block(kv_caches: KVCache) -> int:
        k_cache = kv_caches[0][0]
        return 2 * len(kv_caches) * k_cache[0].numel() * k_cache.element_size()

    @torch.inference_mode()
    def save(self, device_blocks: list[int], host_blocks: list[int]) -> None:
        """Copy device blocks into host blocks (pairwise)."""
        src = torch.tensor(device_blocks, device=self.device)
        dst = torch.tensor(host_blocks)
        for (k_cache, v_cache), (k_host, v_host) in zip(self.kv_caches, self.host_caches):
            k_host.index_copy_(0, dst, k_cache.index_select(0, src).cpu())
            v_host.index_copy_(0, dst, v_cache.index_select(0, src).cpu())

    @torch.inference_mode()
    def load(self, host_blocks: list[int], device_blocks: list[int]) -> None:
        """Copy host blocks into device blocks (pairwise)."""
        src = torch.tensor(host_blocks)
        dst = torch.tensor(device_blocks, device=self.device)
        for (k_cache, v_cache), (k_host, v_host) in zip(self.kv_caches, self.host_caches):
            k_cache.index_copy_(0, dst, k_host.index_select(0, src).to(self.device, non_blocking=True))
            v_cache.index_copy_(0, dst, v_host.index_select(0, src).to(self.device, non_blocking=True))
