"""The pool of physical KV blocks: free list, reference counts and the prefix cache. Plain Python, no torch.

A block is free, held (by one or more sequences' block tables, counted), or cached but held by
nobody: a block in the prefix cache sits under the digest of its tokens (block_manager.py builds
the digests) and still hits after its last holder lets go, until the pool needs it, least
recently used first. Which sequence holds which blocks is block_manager.py's business; the pool
only counts holders.

A block released as the source of a copy-on-write copy is not handed out again before the step
that performs the copy has run (`release_copy_sources`), even when nobody holds it any more, so
that nothing written between scheduling and the copy (a session copied back from host memory)
lands there.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass


@dataclass
class KVBlock:
    """One physical block's state (read-only outside the pool)."""

    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set while the block is in the prefix cache


class BlockPool:
    """`num_blocks` physical blocks with reference counts, and the prefix cache's digest -> block map."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        # Read-only outside the pool:
        self.blocks = [KVBlock(i) for i in range(num_blocks)]  # by block id
        self.free_ids: deque[int] = deque(range(num_blocks))  # never cached, or evicted from the cache
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self.copy_sources: set[int] = set()  # released as copy sources this step
        self._cache: dict[bytes, int] = {}
        self.prefix_cache_queries = 0  # prompt tokens looked up by admitted sequences
        self.prefix_cache_hits = 0  # of which found in the cache

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, or cached but unreferenced)."""
        return len(self.free_ids) + len(self.evictable)

    def ref_count(self, block_id: int) -> int:
        return self.blocks[block_id].ref_count

    def count_prefix_query(self, num_tokens: int, num_hit: int) -> None:
        """Record one admitted lookup (failed admissions retry and are not counted)."""
        self.prefix_cache_queries += num_tokens
        self.prefix_cache_hits += num_hit

    def allocate(self) -> int:
        """A block held once: a free one, else the least recently used cached one (which leaves
        the cache). The caller has checked `num_free_blocks`."""
        if self.free_ids:
            block = self.blocks[self.free_ids.popleft()]
        else:
            block_id, _ = self.evictable.popitem(last=False)
            block = self.blocks[block_id]
            del self._cache[block.hash]
            block.hash = None
        block.ref_count = 1
        return block.block_id

    def take(self, block_id: int) -> None:
        """One more holder of an allocated or cached block."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self.evictable.pop(block_id, None)  # (not there: a copy source of this step)
        block.ref_count += 1

    def release(self, block_id: int) -> None:
        """One holder less; a block nobody holds is free again (or stays hit-able if cached)."""
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0 and block_id not in self.copy_sources:
            self._give_back(block_id)

    def release_copy_source(self, block_id: int) -> None:
        """One holder less of a block this step copies from: kept until `release_copy_sources`."""
        self.blocks[block_id].ref_count -= 1
        self.copy_sources.add(block_id)

    def release_copy_sources(self) -> None:
        """The last step has run its copies: sources nobody holds go back to the pool."""
        for block_id in self.copy_sources:
            if self.blocks[block_id].ref_count == 0:
                self._give_back(block_id)
        self.copy_sources.clear()

    def cached_block(self, digest: bytes) -> int | None:
        """The block cached under this digest, if any."""
        return self._cache.get(digest)

    def cache(self, block_id: int, digest: bytes) -> None:
        """Put a written block under its digest, unless the digest or the block is cached already
        (two sequences can compute the same block at once; the first one is cached)."""
        block = self.blocks[block_id]
        if digest not in self._cache and block.hash is None:
            self._cache[digest] = block_id
            block.hash = digest

    def uncache(self, block_id: int) -> None:
        """Take a held block out of the prefix cache (its slots will be rewritten)."""
        block = self.blocks[block_id]
        if block.hash is not None:
            del self._cache[block.hash]
            block.hash = None

    def forget(self, hashes: list[bytes]) -> None:
        """Take the blocks cached under these digests that nobody holds out of the prefix cache."""
        for digest in hashes:
            block_id = self._cache.get(digest)
            if block_id is not None and self.blocks[block_id].ref_count == 0:
                del self._cache[digest]
                self.blocks[block_id].hash = None
                if block_id in self.evictable:  # else a copy source, freed after its step
                    del self.evictable[block_id]
                    self.free_ids.append(block_id)

    def _give_back(self, block_id: int) -> None:
        """An unreferenced block goes to the free list, or stays hit-able if it is cached."""
        if self.blocks[block_id].hash is None:
            self.free_ids.append(block_id)
        else:
            self.evictable[block_id] = None
