"""Block tables of sequences over the block pool: prefix-cache hits, copy-on-write, detach/attach. Plain Python.

A sequence's block table lists the physical blocks (block_pool.py) that hold its cache in
order. A *full* block whose K/V has been written can enter the prefix cache under a hash that
chains its parent block's hash with its own token ids, so a later sequence whose tokens start
the same way takes those blocks by reference instead of recomputing them. A block shared by
several sequences is copied before one of them writes into it (copy-on-write); the caller
performs the copies this returns.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from scheduler.block_pool import BlockPool


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
    """Block tables of `block_size` token slots per sequence, over a pool of `num_blocks`."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.pool = BlockPool(num_blocks)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._seqs: dict[str, _SeqBlocks] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, or cached but unreferenced)."""
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.pool.num_free_blocks

    @property
    def prefix_cache_queries(self) -> int:
        """Prompt tokens looked up by admitted sequences."""
        return self.pool.prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        """Prompt tokens found in the prefix cache by admitted sequences."""
        return self.pool.prefix_cache_hits

    # The pool's free list, cached unreferenced blocks and this step's copy sources (invariant checks).
    @property
    def _free(self) -> deque[int]:
        return self.pool.free_ids

    @property
    def _evictable(self) -> OrderedDict[int, None]:
        return self.pool.evictable

    @property
    def _copy_sources(self) -> set[int]:
        return self.pool.copy_sources

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: str) -> list[int]:
        """The sequence's physical blocks in cache order (do not modify)."""
        return self._seqs[seq_id].table

    def has_seq(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def ref_count(self, block_id: int) -> int:
        return self.pool.ref_count(block_id)

    def count_prefix_query(self, num_tokens: int, num_hit: int) -> None:
        """Record one admitted lookup (failed admissions retry and are not counted)."""
        self.pool.count_prefix_query(num_tokens, num_hit)

    def release_copy_sources(self) -> None:
        """The last step has run its copies: sources nobody holds go back to the pool (call
        before scheduling)."""
        self.pool.release_copy_sources()

    def forget(self, hashes: list[bytes]) -> None:
        """Take the blocks cached under these digests that nobody holds out of the prefix cache."""
        self.pool.forget(hashes)

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
        pool = self.pool
        parent = seq.root
        limit = len(token_ids) - 1 if max_hit_tokens is None else min(len(token_ids) - 1, max_hit_tokens)
        for i in range(limit // self.block_size):
            digest = block_hash(parent, token_ids[i * self.block_size:(i + 1) * self.block_size])
            block_id = pool.cached_block(digest)
            if block_id is None:
                break
            pool.take(block_id)
            seq.table.append(block_id)
            seq.hashes.append(digest)
            parent = digest
        return len(seq.table) * self.block_size

    def allocate_slots(self, seq_id: str, num_computed: int, num_new: int) -> list[tuple[int, int]] | None:
        """Make room to write tokens [num_computed, num_computed + num_new) of the sequence.

        Returns the (src, dst) block copies to perform before the write (copy-on-write of a
        shared block), or None when the pool is short; then nothing has changed.
        """
        seq = self._seqs[seq_id]
        pool = self.pool
        num_missing = self.blocks_for(num_computed + num_new) - len(seq.table)
        first = num_computed // self.block_size  # the block the first new token goes into
        # That block if the table holds it already: copied first if shared, else written in place.
        written = pool.blocks[seq.table[first]] if num_new > 0 and first < len(seq.table) else None
        copy_first = written is not None and written.ref_count > 1
        if max(num_missing, 0) + copy_first > pool.num_free_blocks:
            return None
        copies = []
        if copy_first:
            src = seq.table[first]
            dst = pool.allocate()
            pool.release_copy_source(src)
            seq.table[first] = dst
            copies.append((src, dst))
        elif written is not None and written.hash is not None:
            # Written in place: a block cut back by `truncate` while it was shared stayed in the
            # prefix cache, expecting a copy; its sharer has let go since, so it leaves now.
            pool.uncache(written.block_id)
        for _ in range(num_missing):
            seq.table.append(pool.allocate())
        return copies

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
            self.pool.cache(seq.table[i], digest)
            seq.hashes.append(digest)
            parent = digest

    def fork(self, parent_id: str, child_id: str) -> None:
        """Give child_id the parent's blocks by reference (n completions of one prompt)."""
        parent = self._seqs[parent_id]
        for block_id in parent.table:
            self.pool.take(block_id)
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
            self.pool.release(seq.table.pop())
        del seq.hashes[num_slots // self.block_size:]
        if num_slots % self.block_size and self.pool.ref_count(seq.table[-1]) == 1:
            self.pool.uncache(seq.table[-1])

    def stop_caching(self, seq_id: str) -> None:
        """The sequence's later blocks never enter the prefix cache (its cache was edited)."""
        self._seqs[seq_id].frozen = True

    def drop_block(self, seq_id: str, index: int) -> None:
        """Remove one block from the sequence's table (sink eviction); it returns to the pool
        when nobody else holds it."""
        seq = self._seqs[seq_id]
        seq.frozen = True
        self.pool.release(seq.table.pop(index))

    def free(self, seq_id: str, forget: bool = False) -> None:
        """Drop the sequence's references; unreferenced cached blocks stay hit-able, unless
        `forget`: then the blocks nobody else holds leave the prefix cache too (an ended
        session's history can no longer be found by anyone)."""
        seq = self._seqs.pop(seq_id)
        pool = self.pool
        # Tail first, so a prompt's later blocks are evicted before its shared beginning.
        for block_id in reversed(seq.table):
            if forget and pool.ref_count(block_id) == 1:
                pool.uncache(block_id)
            pool.release(block_id)
        if forget:  # a table restored from host memory: its history is cached in other blocks
            pool.forget(seq.hashes)

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
        if detached.num_blocks > self.pool.num_free_blocks:
            return None
        table = [self.pool.allocate() for _ in range(detached.num_blocks)]
        self._seqs[seq_id] = _SeqBlocks(table, list(detached.hashes), detached.frozen, detached.root)
        return table
