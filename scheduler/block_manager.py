"""Physical KV blocks: a free list, reference counts, block tables and a prefix cache.

Plain Python, no torch. A sequence's block table lists the physical blocks that hold its
cache in order. A *full* block whose K/V has been written can enter the prefix cache under a
hash that chains its parent block's hash with its own token ids, so a later sequence whose
tokens start the same way takes those blocks by reference instead of recomputing them.
Blocks nobody holds any more stay in the cache (and still hit) until the pool needs them,
least recently used first. A block shared by several sequences is copied before one of them
writes into it (copy-on-write); the caller performs the copies this returns.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field


def block_hash(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """A digest of a full block's tokens and everything before it (via the parent's digest)."""
    h = hashlib.sha256(parent or b"root")
    h.update(",".join(map(str, token_ids)).encode())
    return h.digest()


def salt_root(cache_salt: str | None) -> bytes | None:
    """The parent digest of a salted sequence's first block: sequences share cached blocks only
    with sequences of the same salt (None: the unsalted chain)."""
    if cache_salt is None:
        return None
    return hashlib.sha256(b"salt\0" + cache_salt.encode("utf-8", "surrogatepass")).digest()


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set while the block is in the prefix cache


@dataclass(frozen=True)
class DetachedSeq:
    """A sequence's block-table layout with its blocks given back (their K/V copied elsewhere)."""

    num_blocks: int
    hashes: list[bytes]
    frozen: bool
    root: bytes | None


@dataclass
class _SeqBlocks:
    table: list[int] = field(default_factory=list)
    # Hash chain of the leading full blocks already committed (or taken from the cache).
    hashes: list[bytes] = field(default_factory=list)
    # After an eviction the table no longer lines up with the tokens: nothing more is cached.
    frozen: bool = False
    root: bytes | None = None  # the parent digest of the first block (salt_root)


class BlockManager:
    """Hands out blocks of `block_size` token slots from a pool of `num_blocks`."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))  # never cached, or evicted from the cache
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self._cache: dict[bytes, int] = {}
        self._seqs: dict[str, _SeqBlocks] = {}
        # Sources of this step's copy-on-write copies: not handed out again before the step
        # has run the copies, even when nobody holds them any more, so that nothing written
        # between scheduling and the copy (a session copied back from host memory) lands there.
        self._copy_sources: set[int] = set()
        self.prefix_cache_queries = 0  # prompt tokens looked up by admitted sequences
        self.prefix_cache_hits = 0  # of which found in the cache

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, or cached but unreferenced)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: str) -> list[int]:
        """The sequence's physical blocks in cache order (do not modify)."""
        return self._seqs[seq_id].table

    def has_seq(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def start(self, seq_id: str, token_ids: Sequence[int], max_hit_tokens: int | None = None,
              cache_salt: str | None = None) -> int:
        """Open a block table for a sequence about to be computed from token_ids.

        Takes the longest cached prefix of whole blocks, stopping short of the last token
        (its logits are needed, so it is always computed) and of max_hit_tokens, among the
        blocks cached under the same `cache_salt`. Returns the number of tokens whose K/V is
        already in the table.
        """
        if seq_id in self._seqs:
            raise KeyError(f"sequence {seq_id!r} already has blocks")
        seq = self._seqs[seq_id] = _SeqBlocks(root=salt_root(cache_salt))
        if not self.enable_prefix_caching:
            return 0
        parent = seq.root
        limit = len(token_ids) - 1 if max_hit_tokens is None else min(len(token_ids) - 1, max_hit_tokens)
        for i in range(limit // self.block_size):
            digest = block_hash(parent, token_ids[i * self.block_size:(i + 1) * self.block_size])
            block_id = self._cache.get(digest)
            if block_id is None:
                break
            self._take(block_id)
            seq.table.append(block_id)
            seq.hashes.append(digest)
            parent = digest
        return len(seq.table) * self.block_size

    def count_prefix_query(self, num_tokens: int, num_hit: int) -> None:
        """Record one admitted lookup (failed admissions retry and are not counted)."""
        self.prefix_cache_queries += num_tokens
        self.prefix_cache_hits += num_hit

    def allocate_slots(self, seq_id: str, num_computed: int, num_new: int) -> list[tuple[int, int]] | None:
        """Make room to write tokens [num_computed, num_computed + num_new) of the sequence.

        Returns the (src, dst) block copies to perform before the write (copy-on-write of a
        shared block), or None when the pool is short; then nothing has changed.
        """
        seq = self._seqs[seq_id]
        num_missing = self.blocks_for(num_computed + num_new) - len(seq.table)
        first = num_computed // self.block_size  # the block the first new token goes into
        copy_first = num_new > 0 and first < len(seq.table) and self._blocks[seq.table[first]].ref_count > 1
        if max(num_missing, 0) + copy_first > self.num_free_blocks:
            return None
        copies = []
        if copy_first:
            src = seq.table[first]
            dst = self._pop_free()
            self._release(src, copy_source=True)
            seq.table[first] = dst
            copies.append((src, dst))
        elif num_new > 0 and first < len(seq.table):
            # Written in place: a block cut back by `truncate` while it was shared stayed in the
            # prefix cache, expecting a copy; its sharer has let go since, so it leaves now.
            block = self._blocks[seq.table[first]]
            if block.hash is not None:
                del self._cache[block.hash]
                block.hash = None
        for _ in range(num_missing):
            seq.table.append(self._pop_free())
        return copies

    def release_copy_sources(self) -> None:
        """The last step has run its copies: sources nobody holds go back to the pool (call
        before scheduling)."""
        for block_id in self._copy_sources:
            if self._blocks[block_id].ref_count == 0:
                self._give_back(block_id)
        self._copy_sources.clear()

    def commit(self, seq_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """Offer the sequence's full blocks among its first num_computed tokens to the prefix cache.

        Call once their K/V is written: only then may another sequence read them.
        """
        seq = self._seqs[seq_id]
        if not self.enable_prefix_caching or seq.frozen:
            return
        parent = seq.hashes[-1] if seq.hashes else seq.root
        for i in range(len(seq.hashes), num_computed // self.block_size):
            digest = block_hash(parent, token_ids[i * self.block_size:(i + 1) * self.block_size])
            block = self._blocks[seq.table[i]]
            # Two sequences can compute the same block at once; the first one is cached.
            if digest not in self._cache and block.hash is None:
                self._cache[digest] = block.block_id
                block.hash = digest
            seq.hashes.append(digest)
            parent = digest

    def fork(self, parent_id: str, child_id: str) -> None:
        """Give child_id the parent's blocks by reference (n completions of one prompt)."""
        parent = self._seqs[parent_id]
        for block_id in parent.table:
            self._take(block_id)
        self._seqs[child_id] = _SeqBlocks(list(parent.table), list(parent.hashes), parent.frozen, parent.root)

    def rename(self, seq_id: str, new_id: str) -> None:
        """Hand a sequence's blocks to another owner id (a session keeping a request's cache)."""
        if new_id in self._seqs:
            raise KeyError(f"sequence {new_id!r} already has blocks")
        self._seqs[new_id] = self._seqs.pop(seq_id)

    def truncate(self, seq_id: str, num_slots: int) -> None:
        """Keep only the table's first num_slots slots; later writes go after them.

        A kept partial block that sits in the prefix cache leaves it (its tail will be
        rewritten); a shared one is copied on the write, as usual.
        """
        seq = self._seqs[seq_id]
        num_blocks = self.blocks_for(num_slots)
        while len(seq.table) > num_blocks:
            self._release(seq.table.pop())
        del seq.hashes[num_slots // self.block_size:]
        if num_slots % self.block_size:
            block = self._blocks[seq.table[-1]]
            if block.hash is not None and block.ref_count == 1:
                del self._cache[block.hash]
                block.hash = None

    def stop_caching(self, seq_id: str) -> None:
        """The sequence's later blocks never enter the prefix cache (its cache was edited)."""
        self._seqs[seq_id].frozen = True

    def drop_block(self, seq_id: str, index: int) -> None:
        """Remove one block from the sequence's table (sink eviction); it returns to the pool
        when nobody else holds it."""
        seq = self._seqs[seq_id]
        seq.frozen = True
        self._release(seq.table.pop(index))

    def free(self, seq_id: str, forget: bool = False) -> None:
        """Drop the sequence's references; unreferenced cached blocks stay hit-able, unless
        `forget`: then the blocks nobody else holds leave the prefix cache too (an ended
        session's history can no longer be found by anyone)."""
        seq = self._seqs.pop(seq_id)
        # Tail first, so a prompt's later blocks are evicted before its shared beginning.
        for block_id in reversed(seq.table):
            block = self._blocks[block_id]
            if forget and block.ref_count == 1 and block.hash is not None:
                del self._cache[block.hash]
                block.hash = None
            self._release(block_id)
        if forget:  # a table restored from host memory: its history is cached in other blocks
            self.forget(seq.hashes)

    def detach(self, seq_id: str) -> DetachedSeq:
        """Give the sequence's blocks back and keep only its table's layout, for `attach` to
        restore into fresh blocks once the caller has copied their K/V out (idle sessions
        moved to host memory). Cached blocks stay hit-able, as after `free`."""
        seq = self._seqs[seq_id]
        detached = DetachedSeq(len(seq.table), list(seq.hashes), seq.frozen, seq.root)
        self.free(seq_id)
        return detached

    def attach(self, seq_id: str, detached: DetachedSeq) -> list[int] | None:
        """A detached sequence's table again, in fresh blocks for the caller to copy its K/V
        into; None when the pool is short (then nothing has changed). The fresh blocks are not
        in the prefix cache; the sequence's later full blocks may enter it, as before."""
        if seq_id in self._seqs:
            raise KeyError(f"sequence {seq_id!r} already has blocks")
        if detached.num_blocks > self.num_free_blocks:
            return None
        table = [self._pop_free() for _ in range(detached.num_blocks)]
        self._seqs[seq_id] = _SeqBlocks(table, list(detached.hashes), detached.frozen, detached.root)
        return table

    def forget(self, hashes: list[bytes]) -> None:
        """Take the blocks cached under these digests that nobody holds out of the prefix cache."""
        for digest in hashes:
            block_id = self._cache.get(digest)
            if block_id is not None and self._blocks[block_id].ref_count == 0:
                del self._cache[digest]
                self._blocks[block_id].hash = None
                if block_id in self._evictable:  # else a copy source, freed after its step
                    del self._evictable[block_id]
                    self._free.append(block_id)

    def _take(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            self._evictable.pop(block_id, None)  # (not there: a copy source of this step)
        block.ref_count += 1

    def _release(self, block_id: int, copy_source: bool = False) -> None:
        block = self._blocks[block_id]
        block.ref_count -= 1
        if copy_source:
            self._copy_sources.add(block_id)
        if block.ref_count == 0 and block_id not in self._copy_sources:
            self._give_back(block_id)

    def _give_back(self, block_id: int) -> None:
        """An unreferenced block goes to the free list, or stays hit-able if it is cached."""
        if self._blocks[block_id].hash is None:
            self._free.append(block_id)
        else:
            self._evictable[block_id] = None

    def _pop_free(self) -> int:
        if self._free:
            block = self._blocks[self._free.popleft()]
        else:
            block_id, _ = self._evictable.popitem(last=False)
            block = self._blocks[block_id]
            del self._cache[block.hash]
            block.hash = None
        block.ref_count = 1
        return block.block_id
