"""The Responses API's stored responses: what a store keeps and the interface of every store,
bounded, per API key; `MemoryResponseStore` keeps them in this process (`--response-store memory`),
`server/response_store_sqlite.py` in a file that survives restarts and that the replicas of one
host share (the default), `server/response_store_redis.py` in Redis, for replicas on several
hosts (server/response_stores.py opens the one `--response-store` names). Plain Python.

A stored response keeps what its turn added to the conversation (its own input messages and
its output text, never its `instructions`, which OpenAI does not carry over) and a reference to
the response it continued (`previous_response_id`): the conversation of a chain is the walk from
its root. Every response of a chain shares one `Chain`, which names the engine session (its KV
cache between turns) that the chain's turns run under.

Bounds: at most `max_responses` responses are kept by id, and `max_bytes` of their text (an
estimate of the Python objects' memory); past either, the API key holding the largest share of
the store (its responses over `max_responses`, or its bytes over `max_bytes`, whichever is
larger) forgets its least recently used response (stored, retrieved or continued least
recently) first, so that a key never loses a response to another key's flood while it holds
less than that key; a response unused for `ttl` seconds is forgotten too. A forgotten response
cannot be retrieved, deleted or continued (404), but the responses that continue it still hold
its part of their history, so their chains go on: its memory is freed, and no longer counted,
once no kept response needs it. A chain's session is ended when no response of the chain is
kept any more (the caller ends it in the engine: `add`, `delete` and `get` return the sessions
to end).

Tenancy: a response is kept with the tenant (API key) that created it, and looking it up with
another tenant is the same as looking up an unknown id.

Every method runs in well under a millisecond except when many responses expire or are evicted
at once (each is O(1)); a lock makes the store safe to use from worker threads too.
"""

from __future__ import annotations

import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

# The bounds' defaults, the CLI's (why these: server/defaults.py).
from server.defaults import (DEFAULT_MAX_CHAIN_TOKENS, DEFAULT_MAX_STORED_RESPONSES, DEFAULT_RESPONSE_STORE_BYTES,
                             DEFAULT_RESPONSE_TTL)
# Estimated bytes of a response beside its texts (the objects, ids, the response's fields).
_RESPONSE_OVERHEAD = 2048
_ITEM_OVERHEAD = 200


@dataclass(eq=False)
class Chain:
    """What the responses of one chain (a root and everything that continues it) share."""

    session_id: str | None  # the engine session of the chain (tenant-scoped); None: no session
    head_id: str | None = None  # the response whose turn the session's cache holds now
    num_kept: int = 0  # responses of the chain kept by id


@dataclass(eq=False)
class StoredResponse:
    id: str
    tenant: str | None
    chain: Chain
    parent: StoredResponse | None  # the response this one continued
    input_items: tuple[tuple[str, str, str], ...]  # (item id, role, text) of this turn's input
    instructions: str | None  # this turn's only
    output_text: str
    message_id: str
    fields: dict  # the rest of the response object, as returned
    last_used: float = 0.0
    refs: int = 0  # 1 while kept by id, plus one per alive response continuing it
    size: int = 0

    def __post_init__(self):
        texts = [self.output_text, self.instructions or ""] + [text for _, _, text in self.input_items]
        metadata = self.fields.get("metadata") or {}
        self.size = (_RESPONSE_OVERHEAD + _ITEM_OVERHEAD * len(self.input_items) + sum(map(sys.getsizeof, texts))
                     + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in metadata.items()))

    def conversation(self) -> list[tuple[str, str]]:
        """(role, text) of every message of the chain up to and including this response's
        output: each turn's input, then its reply."""
        turns = []
        node = self
        while node is not None:
            turns.append(node)
            node = node.parent
        messages = []
        for turn in reversed(turns):
            messages += [(role, text) for _, role, text in turn.input_items]
            messages.append(("assistant", turn.output_text))
        return messages


class ResponseStore(ABC):
    """Where stored responses live. Every method is thread-safe and may block briefly (a file or
    a network store): callers on the event loop run them in a worker thread. The sessions they
    return are engine sessions (of this process) that the caller ends."""

    max_chain_tokens: int
    description: str  # for the startup log

    @abstractmethod
    def get(self, response_id: str, tenant: str | None) -> tuple[StoredResponse | None, list[str]]:
        """The tenant's response with its history (None: unknown, expired, or another tenant's),
        marked as used; and the sessions to end."""

    @abstractmethod
    def add(self, node: StoredResponse) -> list[str]:
        """Keep a new response (its parents' history with it); the sessions to end."""

    @abstractmethod
    def delete(self, response_id: str, tenant: str | None) -> tuple[bool, list[str]]:
        """Forget the tenant's response: whether it was there, and the sessions to end."""

    @abstractmethod
    def expire(self) -> list[str]:
        """Forget responses idle past the TTL; the sessions to end."""

    @abstractmethod
    def __len__(self) -> int:
        """Responses kept by id."""

    def close(self) -> None:
        """Release the store's connections."""


@dataclass
class MemoryResponseStore(ResponseStore):
    """Responses in this process's memory: lost on restart, and a replica sees only its own."""

    max_responses: int = DEFAULT_MAX_STORED_RESPONSES
    ttl: float = DEFAULT_RESPONSE_TTL
    max_bytes: int = DEFAULT_RESPONSE_STORE_BYTES
    max_chain_tokens: int = DEFAULT_MAX_CHAIN_TOKENS
    clock: Callable[[], float] = time.monotonic
    _kept: OrderedDict[str, StoredResponse] = field(default_factory=OrderedDict)  # least recently used first
    # The same ids per API key (None: no keys), least recently used first: when the store is
    # full, the key holding the largest share gives up its oldest, so that one key's flood
    # cannot push out the others' chains.
    _by_tenant: dict[str | None, OrderedDict[str, None]] = field(default_factory=dict)
    _tenant_bytes: dict[str | None, int] = field(default_factory=dict)  # alive bytes per key
    _lock: threading.Lock = field(default_factory=threading.Lock)
    num_bytes: int = 0  # of every response alive (kept, or needed by a kept one)
    num_alive: int = 0
    description: str = "in memory (lost on restart, one replica's own)"

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, response_id: str, tenant: str | None) -> tuple[StoredResponse | None, list[str]]:
        """The tenant's response (None: unknown, expired, or another tenant's), marked as used;
        and the sessions to end (of chains whose responses expired)."""
        with self._lock:
            ended = self._expire()
            node = self._kept.get(response_id)
            if node is None or node.tenant != tenant:
                return None, ended
            node.last_used = self.clock()
            self._kept.move_to_end(response_id)
            self._by_tenant[tenant].move_to_end(response_id)
            return node, ended

    def add(self, node: StoredResponse) -> list[str]:
        """Keep a new response, which becomes its chain's head (its turn ran in the chain's
        session); the sessions to end, of chains whose last response was evicted to make room.
        Its parent may have been forgotten while it ran: the parent's history is alive (and
        counted) again."""
        with self._lock:
            node.last_used = self.clock()
            node.refs = 0
            self._ref(node)
            self._kept[node.id] = node
            self._by_tenant.setdefault(node.tenant, OrderedDict())[node.id] = None
            node.chain.num_kept += 1
            node.chain.head_id = node.id
            ended = self._expire()
            while len(self._kept) > 1 and (len(self._kept) > self.max_responses or self.num_bytes > self.max_bytes):
                victim = self._victim(spare=node.id)
                self._remove(victim)
                ended += self._forget(victim)
            return ended

    def tenant_bytes(self, tenant: str | None) -> int:
        """The bytes of a key's responses alive (kept, or needed by a kept one)."""
        return self._tenant_bytes.get(tenant, 0)

    def _victim(self, spare: str) -> StoredResponse:
        """The least recently used response of the key with the largest share of the store
        (never `spare`, the response just added; the store keeps another one)."""
        def load(tenant: str | None) -> float:
            return max(len(self._by_tenant[tenant]) / self.max_responses, self.tenant_bytes(tenant) / self.max_bytes)

        for tenant in sorted(self._by_tenant, key=load, reverse=True):
            for response_id in self._by_tenant[tenant]:
                if response_id != spare:
                    return self._kept[response_id]
        raise AssertionError("a full store keeps a response besides the one just added")

    def delete(self, response_id: str, tenant: str | None) -> tuple[bool, list[str]]:
        """Forget the tenant's response: (whether it was there, the sessions to end: its chain's
        if it was the chain's head, or the chain's last response)."""
        with self._lock:
            ended = self._expire()
            node = self._kept.get(response_id)
            if node is None or node.tenant != tenant:
                return False, ended
            self._remove(node)
            ended += self._forget(node)
            chain = node.chain
            if chain.head_id == response_id and chain.session_id is not None and chain.session_id not in ended:
                ended.append(chain.session_id)
            if chain.head_id == response_id:
                chain.head_id = None
            return True, ended

    def expire(self) -> list[str]:
        with self._lock:
            return self._expire()

    def _expire(self) -> list[str]:
        ended = []
        now = self.clock()
        while self._kept:
            oldest = next(iter(self._kept.values()))
            if now - oldest.last_used <= self.ttl:
                break
            self._remove(oldest)
            ended += self._forget(oldest)
        return ended

    def _remove(self, node: StoredResponse) -> None:
        """Take a response out of the index (by id, and by its tenant)."""
        del self._kept[node.id]
        ids = self._by_tenant[node.tenant]
        del ids[node.id]
        if not ids:
            del self._by_tenant[node.tenant]

    def _forget(self, node: StoredResponse) -> list[str]:
        """A response just left the index: drop its reference, free what nobody needs."""
        chain = node.chain
        chain.num_kept -= 1
        self._unref(node)
        if chain.num_kept == 0 and chain.session_id is not None:
            return [chain.session_id]
        return []

    def _ref(self, node: StoredResponse | None) -> None:
        while node is not None:
            node.refs += 1
            if node.refs > 1:
                return  # alive already, and so are its ancestors
            self.num_bytes += node.size
            self._tenant_bytes[node.tenant] = self.tenant_bytes(node.tenant) + node.size
            self.num_alive += 1
            node = node.parent

    def _unref(self, node: StoredResponse | None) -> None:
        while node is not None:
            node.refs -= 1
            if node.refs:
                return
            self.num_bytes -= node.size
            self._tenant_bytes[node.tenant] -= node.size
            if not self._tenant_bytes[node.tenant]:
                del self._tenant_bytes[node.tenant]
            self.num_alive -= 1
            node = node.parent
