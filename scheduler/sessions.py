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
expire after a TTL, and can be ended explicitly. A dropped session is rebuilt from the history
the client resends, like any prompt.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from scheduler.block_manager import BlockManager
from scheduler.request import Request
from scheduler.sink_policy import SinkPolicy


@dataclass
class Session:
    session_id: str
    token_ids: list[int]  # the computed history, in order
    num_evicted_tokens: int
    sink_gap: int
    sink_policy: SinkPolicy | None
    last_used: float
    cache_salt: str | None = None  # a request with another salt does not get this cache

    @property
    def blocks_key(self) -> str:
        return f"session\0{self.session_id}"  # cannot collide with a request id


class SessionStore:
    def __init__(self, block_manager: BlockManager, ttl: float = 600.0):
        self.block_manager = block_manager
        self.ttl = ttl
        self._idle: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._busy: dict[str, str] = {}  # session id -> the request that holds its cache now
        self._ended: set[str] = set()  # requests whose session was ended while they ran
        self.num_reused_tokens = 0

    def __len__(self) -> int:
        return len(self._idle) + len(self._busy)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._idle or session_id in self._busy

    def adopt(self, request: Request) -> int | None:
        """Hand the session's cache to its new request; the tokens reused, or None (start afresh)."""
        if request.session_id in self._busy:
            return None  # a concurrent request of the same session: it runs on its own
        self._busy[request.session_id] = request.request_id
        session = self._idle.pop(request.session_id, None)
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
            self.block_manager.free(session.blocks_key)
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
        if session_id in self._busy:
            # Its running request finishes without keeping a cache, and forgets its blocks.
            self._ended.add(self._busy.pop(session_id))
            return True
        return False

    def release_idle(self) -> bool:
        """Free the least recently used idle session (memory pressure); False if none is left."""
        if not self._idle:
            return False
        _, session = self._idle.popitem(last=False)
        self.block_manager.free(session.blocks_key)
        return True

    def expire(self, now: float) -> int:
        expired = [sid for sid, s in self._idle.items() if now - s.last_used > self.ttl]
        for session_id in expired:
            self.block_manager.free(self._idle.pop(session_id).blocks_key)
        return len(expired)
