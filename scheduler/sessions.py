"""Long sessions: a conversation's KV cache kept between its requests. Plain Python.

When a request that carries a session id finishes, its blocks are not freed: they stay with
the session, with its token history and eviction state. The next request of the session (a
client resends the whole history, as OpenAI clients do) takes them over: the cache is cut back
to the longest common prefix of the session's history and the new prompt, and only the rest is
prefilled. Usually that is the whole history; a reply that tokenizes differently when resent
costs the tokens from there on. If evictions happened after that point, the cut cache has lost
a few more old tokens than a token-by-token run over the new prompt would have (its window is
shorter for a while). A prompt that diverges before the kept window restarts the session from
the resent history.

Idle sessions are the first thing given up under memory pressure (least recently used first),
expire after a TTL, and can be ended explicitly. Given up, a session's K/V moves to a host
tier (`HostTier`: host blocks outside the pool, a fixed byte budget) when it has room, and its
next request copies it back into fresh blocks instead of recomputing it; the least recently
used sessions leave the host tier when it is full. A session dropped altogether is rebuilt from
the history the client resends, like any prompt.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from scheduler.block_manager import BlockManager, DetachedSeq
from scheduler.request import Request
from scheduler.sink_policy import SinkPolicy

logger = logging.getLogger(__name__)


@dataclass
class Session:
    session_id: str
    token_ids: list[int]  # the computed history, in order
    num_evicted_tokens: int
    sink_gap: int
    sink_policy: SinkPolicy | None
    last_used: float
    cache_salt: str | None = None  # a request with another salt does not get this cache
    # In the host tier: the host blocks that hold its K/V, and its table's layout.
    host_blocks: list[int] | None = None
    detached: DetachedSeq | None = None

    @property
    def blocks_key(self) -> str:
        return f"session\0{self.session_id}"  # cannot collide with a request id


class KVMover(Protocol):
    """Copies K/V blocks between the device pool and host blocks (model/host_kv.py)."""

    def save(self, device_blocks: list[int], host_blocks: list[int]) -> None: ...

    def load(self, host_blocks: list[int], device_blocks: list[int]) -> None: ...


class HostTier:
    """`num_blocks` host blocks for idle sessions' K/V, and the mover that fills them."""

    def __init__(self, num_blocks: int, mover: KVMover):
        self.num_blocks = num_blocks
        self.mover = mover
        self.free: list[int] = list(range(num_blocks))

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)


class SessionStore:
    def __init__(self, block_manager: BlockManager, ttl: float = 600.0, host: HostTier | None = None):
        self.block_manager = block_manager
        self.ttl = ttl
        self.host = host
        self._idle: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._swapped: OrderedDict[str, Session] = OrderedDict()  # in the host tier; least recently used first
        self._busy: dict[str, str] = {}  # session id -> the request that holds its cache now
        self._ended: set[str] = set()  # requests whose session was ended while they ran
        self.num_reused_tokens = 0
        self.num_swapped_out = 0  # sessions moved to the host tier
        self.num_swapped_in = 0  # sessions copied back from it

    def __len__(self) -> int:
        return len(self._idle) + len(self._swapped) + len(self._busy)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._idle or session_id in self._swapped or session_id in self._busy

    @property
    def num_swapped(self) -> int:
        return len(self._swapped)

    def adopt(self, request: Request) -> int | None:
        """Hand the session's cache to its new request; the tokens reused, or None (start afresh)."""
        if request.session_id in self._busy:
            return None  # a concurrent request of the same session: it runs on its own
        self._busy[request.session_id] = request.request_id
        session = self._idle.pop(request.session_id, None) or self._swapped.pop(request.session_id, None)
        if session is None:
            return None
        prompt = request.token_ids
        common = 0
        limit = min(len(session.token_ids), len(prompt) - 1)  # the last prompt token is always computed
        while common < limit and session.token_ids[common] == prompt[common]:
            common += 1
        sinks = session.sink_policy.num_sinks if session.sink_policy else 0
        window_start = sinks + session.num_evicted_tokens if session.num_evicted_tokens else 0
        if (common == 0 or common < window_start or session.sink_policy != request.sink_policy
                or session.cache_salt != request.cache_salt or not self._swap_in(session)):
            self._discard(session)
            return None
        kept = common - session.num_evicted_tokens
        self.block_manager.truncate(session.blocks_key, kept + (session.sink_gap if kept > sinks else 0))
        self.block_manager.rename(session.blocks_key, request.request_id)
        request.num_computed_tokens = common
        request.num_evicted_tokens = session.num_evicted_tokens
        request.sink_gap = session.sink_gap
        self.num_reused_tokens += common
        return common

    def keep(self, request: Request) -> None:
        """Take over a finished request's cache for its session (instead of freeing it)."""
        if self._busy.get(request.session_id) != request.request_id or request.num_computed_tokens == 0:
            # Not the session's request (concurrent, or the session was ended meanwhile), or
            # nothing computed to keep. An ended session's history leaves the prefix cache too.
            forget = request.request_id in self._ended
            self.release(request)
            self.block_manager.free(request.request_id, forget=forget)
            return
        del self._busy[request.session_id]
        session = Session(
            request.session_id, request.token_ids[:request.num_computed_tokens], request.num_evicted_tokens,
            request.sink_gap, request.sink_policy, time.monotonic(), request.cache_salt)
        self.block_manager.rename(request.request_id, session.blocks_key)
        self._idle[request.session_id] = session

    def release(self, request: Request) -> None:
        """A request of the session lost its cache (preempted, or no blocks for its new tokens),
        or ended without one to keep (failed, or aborted or timed out while waiting): the
        session is free again, and its next request starts afresh."""
        if self._busy.get(request.session_id) == request.request_id:
            del self._busy[request.session_id]
        self._ended.discard(request.request_id)

    def drop(self, session_id: str) -> bool:
        """End a session and free its blocks, which leave the prefix cache too (nobody can find
        its history any more); False if there was none."""
        session = self._idle.pop(session_id, None)
        if session is not None:
            self.block_manager.free(session.blocks_key, forget=True)
            return True
        session = self._swapped.pop(session_id, None)
        if session is not None:
            self.block_manager.forget(session.detached.hashes)
            self._discard(session)
            return True
        if session_id in self._busy:
            # Its running request finishes without keeping a cache, and forgets its blocks.
            self._ended.add(self._busy.pop(session_id))
            return True
        return False

    def release_idle(self) -> bool:
        """Give up the least recently used idle session's blocks (memory pressure): into the
        host tier when it has room, else freed. False if no idle session is left."""
        if not self._idle:
            return False
        session_id, session = self._idle.popitem(last=False)
        if self._swap_out(session):
            self._swapped[session_id] = session
        else:
            self.block_manager.free(session.blocks_key)
        return True

    def expire(self, now: float) -> int:
        expired = 0
        for sessions in (self._idle, self._swapped):
            for session_id in [sid for sid, s in sessions.items() if now - s.last_used > self.ttl]:
                self._discard(sessions.pop(session_id))
                expired += 1
        return expired

    def _swap_out(self, session: Session) -> bool:
        """Copy the session's K/V into host blocks and give its device blocks back; False when
        the host tier cannot hold it (even after dropping its older sessions)."""
        host = self.host
        table = self.block_manager.block_table(session.blocks_key)
        in_tier = sum(len(s.host_blocks) for s in self._swapped.values())
        if host is None or len(host.free) + in_tier < len(table):
            return False  # too large, or the rest of the tier holds a session being copied back
        while len(host.free) < len(table):
            _, oldest = self._swapped.popitem(last=False)
            self._discard(oldest)
        host_blocks = [host.free.pop() for _ in table]
        try:
            host.mover.save(list(table), host_blocks)
        except Exception:  # the session is dropped instead (rebuilt from the next resent history)
            logger.exception("copying session %s to host memory failed", session.session_id)
            host.free += host_blocks
            return False
        session.host_blocks = host_blocks
        session.detached = self.block_manager.detach(session.blocks_key)
        self.num_swapped_out += 1
        return True

    def _swap_in(self, session: Session) -> bool:
        """Copy a session in the host tier back into fresh device blocks (a no-op for one that
        is not there). Other idle sessions make room first; False if the pool is still short."""
        if session.host_blocks is None:
            return True
        while (session.detached.num_blocks > self.block_manager.num_free_blocks) and self.release_idle():
            pass
        table = self.block_manager.attach(session.blocks_key, session.detached)
        if table is None:
            return False
        try:
            self.host.mover.load(session.host_blocks, table)
        except Exception:  # the request starts afresh
            logger.exception("copying session %s back from host memory failed", session.session_id)
            self.block_manager.free(session.blocks_key)
            return False
        self._release_host_blocks(session)
        self.num_swapped_in += 1
        return True

    def _release_host_blocks(self, session: Session) -> None:
        self.host.free += session.host_blocks
        session.host_blocks = session.detached = None

    def _discard(self, session: Session) -> None:
        """Free whatever holds a session's K/V: its device blocks or its host blocks."""
        if session.host_blocks is not None:
            self._release_host_blocks(session)
        else:
            self.block_manager.free(session.blocks_key)
