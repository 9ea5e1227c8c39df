"""Long sessions: a conversation's KV cache kept between its requests. Plain Python.

When a request that carries a session id finishes, its blocks are not freed: they stay with
the session, with its token history and eviction state. The next request of the session (a
client resends the whole history, as OpenAI clients do) forks them, block by reference: the
copy is cut back to the longest common prefix of the session's history and the new prompt, and
only the rest is prefilled. Usually that is the whole history; a reply that tokenizes
differently when resent costs the tokens from there on. If evictions happened after that point,
the cut cache has lost a few more old tokens than a token-by-token run over the new prompt would
have (its window is shorter for a while). A prompt that diverges before the kept window
restarts the session from the resent history.

Forking, not handing over, means that requests of one session that run at once (branches of a
response chain, retries) each take its cache from where it was, and none re-prefills the shared
history (it could not: a windowed session's evicted tokens are gone from every prefix cache).
The session keeps its cache as it was until a request of it finishes; then it holds that
request's cache (the last to finish wins); a write into a shared block is copied first.

Idle sessions are the first thing given up under memory pressure, expire after a TTL, and can be
ended explicitly. Under pressure the API key (tenant) whose sessions hold the most blocks gives
up its least recently used one first, so that a key never loses a session to another key's
while it holds fewer blocks than that key. Given up, a session's K/V moves to a host tier
(`HostTier`: host blocks outside the pool, a fixed byte budget) when it has room, and its next
request copies it back into fresh blocks instead of recomputing it; when the host tier is full,
the key holding the most host blocks loses its least recently used session there. A session
with a request running from it is freed instead of moved (that request carries its history
on). A session dropped altogether is rebuilt from the history the client resends, like any
prompt.
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
    tenant: str | None = None  # the API key whose share of session memory it counts in
    # In the host tier: the host blocks that hold its K/V, and its table's layout.
    host_blocks: list[int] | None = None
    detached: DetachedSeq | None = None

    @property
    def blocks_key(self) -> str:
        return f"session\0{self.session_id}"  # cannot collide with a request id


class KVMover(Protocol):
    """Copies K/V blocks between the device pool and host blocks (model/execution/host_kv.py)."""

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
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # in device blocks; least recently used first
        self._swapped: OrderedDict[str, Session] = OrderedDict()  # in the host tier; least recently used first
        self._running: dict[str, set[str]] = {}  # session id -> its requests running now
        self._ended: set[str] = set()  # requests whose session was ended while they ran
        self.num_reused_tokens = 0
        self.num_swapped_out = 0  # sessions moved to the host tier
        self.num_swapped_in = 0  # sessions copied back from it

    def __len__(self) -> int:
        return len(self._sessions.keys() | self._swapped.keys() | self._running.keys())

    @property
    def num_host_blocks(self) -> int:
        return self.host.num_blocks if self.host else 0

    @property
    def num_host_blocks_used(self) -> int:
        return self.host.num_used_blocks if self.host else 0

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions or session_id in self._swapped or session_id in self._running

    @property
    def num_swapped(self) -> int:
        return len(self._swapped)

    def adopt(self, request: Request) -> int | None:
        """Give a new request of the session a fork of the session's cache; the tokens reused,
        or None (it starts afresh)."""
        self._running.setdefault(request.session_id, set()).add(request.request_id)
        session = self._sessions.get(request.session_id) or self._swapped.get(request.session_id)
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
                or session.cache_salt != request.cache_salt):
            self._discard(self._forget_session(session.session_id))
            return None
        if not self._swap_in(session):
            return None
        self._sessions.move_to_end(session.session_id)
        session.last_used = time.monotonic()
        self.block_manager.fork(session.blocks_key, request.request_id)
        kept = common - session.num_evicted_tokens
        self.block_manager.truncate(request.request_id, kept + (session.sink_gap if kept > sinks else 0))
        request.num_computed_tokens = common
        request.num_evicted_tokens = session.num_evicted_tokens
        request.sink_gap = session.sink_gap
        self.num_reused_tokens += common
        return common

    def keep(self, request: Request) -> None:
        """A finished request's cache becomes its session's (instead of being freed)."""
        self._leave(request)
        if request.request_id in self._ended or request.num_computed_tokens == 0:
            # The session was ended while it ran (its history leaves the prefix cache too), or
            # there is nothing to keep.
            forget = request.request_id in self._ended
            self._ended.discard(request.request_id)
            self.block_manager.free(request.request_id, forget=forget)
            return
        old = self._forget_session(request.session_id)
        if old is not None:
            self._discard(old)
        session = Session(
            request.session_id, request.token_ids[:request.num_computed_tokens], request.num_evicted_tokens,
            request.sink_gap, request.sink_policy, time.monotonic(), request.cache_salt, request.tenant)
        self.block_manager.rename(request.request_id, session.blocks_key)
        self._sessions[request.session_id] = session

    def release(self, request: Request) -> None:
        """A request of the session lost its cache (preempted, or no blocks for its new tokens),
        or ended without one to keep (failed, or aborted or timed out while waiting): the
        session's own cache is as it was."""
        self._leave(request)
        self._ended.discard(request.request_id)

    def drop(self, session_id: str) -> bool:
        """End a session and free its blocks, which leave the prefix cache too (nobody can find
        its history any more); its running requests finish without keeping a cache. False if
        there was none."""
        session = self._forget_session(session_id)
        if session is not None:
            if session.host_blocks is not None:
                self.block_manager.forget(session.detached.hashes)
                self._discard(session)
            else:
                self.block_manager.free(session.blocks_key, forget=True)
        running = self._running.pop(session_id, set())
        self._ended |= running
        return session is not None or bool(running)

    def release_idle(self) -> bool:
        """Give up one session's device blocks (memory pressure): the least recently used of the
        key whose sessions hold the most, into the host tier when it has room and no request
        runs from it, else freed. False if no session holds device blocks."""
        session = self._fair_victim(self._sessions, lambda s: len(self.block_manager.block_table(s.blocks_key)))
        if session is None:
            return False
        del self._sessions[session.session_id]
        if not self._running.get(session.session_id) and self._swap_out(session):
            self._swapped[session.session_id] = session
        else:
            self.block_manager.free(session.blocks_key)
        return True

    def expire(self, now: float) -> int:
        expired = 0
        for sessions in (self._sessions, self._swapped):
            for session_id in [sid for sid, s in sessions.items() if now - s.last_used > self.ttl]:
                self._discard(sessions.pop(session_id))
                expired += 1
        return expired

    def _leave(self, request: Request) -> None:
        running = self._running.get(request.session_id)
        if running is not None:
            running.discard(request.request_id)
            if not running:
                del self._running[request.session_id]

    def _forget_session(self, session_id: str) -> Session | None:
        """Take a session out of the store (its blocks are the caller's to free)."""
        return self._sessions.pop(session_id, None) or self._swapped.pop(session_id, None)

    @staticmethod
    def _fair_victim(sessions: OrderedDict[str, Session], size) -> Session | None:
        """The least recently used of `sessions` of the key whose sessions there are the largest
        (by `size`, in blocks)."""
        if not sessions:
            return None
        held: dict[str | None, int] = {}
        for session in sessions.values():
            held[session.tenant] = held.get(session.tenant, 0) + size(session)
        heaviest = max(held, key=held.get)
        return next(s for s in sessions.values() if s.tenant == heaviest)

    def _swap_out(self, session: Session) -> bool:
        """Copy the session's K/V into host blocks and give its device blocks back; False when
        the host tier cannot hold it (even after the key with the most host blocks has given
        up its oldest sessions there)."""
        host = self.host
        table = self.block_manager.block_table(session.blocks_key)
        in_tier = sum(len(s.host_blocks) for s in self._swapped.values())
        if host is None or len(host.free) + in_tier < len(table):
            return False  # too large, or the rest of the tier holds a session being copied back
        while len(host.free) < len(table):
            victim = self._fair_victim(self._swapped, lambda s: len(s.host_blocks))
            self._discard(self._swapped.pop(victim.session_id))
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
        is not there). Other sessions make room first (never this one's host blocks: it leaves
        the tier first); False if the pool is still short, and then the session is dropped."""
        if session.host_blocks is None:
            return True
        del self._swapped[session.session_id]
        while (session.detached.num_blocks > self.block_manager.num_free_blocks) and self.release_idle():
            pass
        table = self.block_manager.attach(session.blocks_key, session.detached)
        if table is None:
            self._release_host_blocks(session)
            return False
        try:
            self.host.mover.load(session.host_blocks, table)
        except Exception:  # the request starts afresh
            logger.exception("copying session %s back from host memory failed", session.session_id)
            self.block_manager.free(session.blocks_key)
            self._release_host_blocks(session)
            return False
        self._release_host_blocks(session)
        self._sessions[session.session_id] = session
        self.num_swapped_in += 1
        return True

    def _release_host_blocks(self, session: Session) -> None:
        self.host.free += session.host_blocks
        session.host_blocks = session.detached = None

    def _discard(self, session: Session | None) -> None:
        """Free whatever holds a session's K/V: its device blocks or its host blocks."""
        if session is None:
            return
        if session.host_blocks is not None:
            self._release_host_blocks(session)
        else:
            self.block_manager.free(session.blocks_key)
