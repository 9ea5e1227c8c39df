"""The policy of a store that outlives the process and may be shared by several servers: the
bounds of server/response_store.py (at most `max_responses` kept by id, `max_bytes` of them,
the key with the largest share losing its least recently used first, a TTL), kept in rows that
a backend stores (SQLite: server/response_store_sqlite.py; Redis: server/response_store_redis.py).

A row is one response: its own turn (input items, instructions, output text, fields), its
tenant, its parent's id, its chain's root id and session, its size, when it was last used
(wall-clock seconds: the row outlives the process), and whether it is kept by id. A response
forgotten while a kept one continues it stays as an unkept row (its history is theirs), and goes
once no row names it as parent. Every method runs in one backend transaction, so replicas
sharing the backend see one store.

A method that fails halfway (a Redis connection lost between two of its writes) can leave an
unkept row that no row needs; every method collects a few such rows (`_stranded`), so the
store's bytes never drift for good.

Sessions are a process's own: the sessions a method returns are the ones this process may hold
(the chain's, once it has no kept response, or once its head is deleted); another replica's
session of the chain ends by its own TTL. Which response a session's cache holds (the chain's
head) is known only to the replica that ran it.
"""

from __future__ import annotations

import json
import threading
import time
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

from server.response_store import Chain, ResponseStore, StoredResponse

# Chains whose head (the response its session's cache holds) a process remembers.
_MAX_HEADS = 100_000
# Responses one method forgets at most (evicted past the bounds, or idle past the TTL), and
# stranded rows it collects at most: a method holds the backend's lock for a bounded time, and a
# store over its bounds (lowered at a restart) shrinks over the next calls.
MAX_FORGOTTEN_PER_CALL = 64
MAX_SWEPT_PER_CALL = 16


@dataclass
class Row:
    """A stored response as a backend keeps it."""

    id: str
    tenant: str | None
    parent_id: str | None
    root_id: str
    session_id: str | None
    input_items: list  # [item id, role, text] per input message
    instructions: str | None
    output_text: str
    message_id: str
    fields: dict
    size: int
    last_used: float
    kept: bool

    def to_json(self) -> str:
        return json.dumps(self.__dict__, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> Row:
        return cls(**json.loads(text))


class SharedResponseStore(ResponseStore):
    """The bounds and the history rules over a backend's rows (the backend: the abstract methods)."""

    def __init__(self, max_responses: int, ttl: float, max_bytes: int, max_chain_tokens: int,
                 clock: Callable[[], float] = time.time):
        self.max_responses = max_responses
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.max_chain_tokens = max_chain_tokens
        self.clock = clock
        self._heads: OrderedDict[str, str] = OrderedDict()  # session id -> head response id (this process's)
        self._heads_lock = threading.Lock()

    # -- the interface ---------------------------------------------------------------------

    def get(self, response_id: str, tenant: str | None) -> tuple[StoredResponse | None, list[str]]:
        with self._transaction():
            ended = self._expire()
            row = self._load(response_id)
            if row is None or not row.kept or row.tenant != tenant:
                return None, ended
            row.last_used = self.clock()
            self._touch(row)
            return self._node(row), ended

    def add(self, node: StoredResponse) -> list[str]:
        with self._transaction():
            # The history it continues: a parent forgotten (and dropped) while this turn ran is
            # written again, unkept, from the objects this turn holds.
            missing = node.parent
            while missing is not None and self._load(missing.id) is None:
                self._insert(self._row(missing, kept=False))
                missing = missing.parent
            now = self.clock()
            row = self._row(node, kept=True, last_used=now)
            self._insert(row)
            ended = self._expire()
            for _ in range(MAX_FORGOTTEN_PER_CALL):
                if self._num_kept() <= 1 or (self._num_kept() <= self.max_responses
                                             and self._num_bytes() <= self.max_bytes):
                    break
                ended += self._forget(self._victim(spare=node.id))
        if node.chain.session_id is not None:
            self._set_head(node.chain.session_id, node.id)
        return ended

    def delete(self, response_id: str, tenant: str | None) -> tuple[bool, list[str]]:
        with self._transaction():
            ended = self._expire()
            row = self._load(response_id)
            if row is None or not row.kept or row.tenant != tenant:
                return False, ended
            ended += self._forget(row)
        session = row.session_id
        if session is not None and self._pop_head(session, response_id) and session not in ended:
            ended.append(session)
        return True, ended

    def expire(self) -> list[str]:
        with self._transaction():
            return self._expire()

    def __len__(self) -> int:
        with self._transaction():
            return self._num_kept()

    # -- the policy ------------------------------------------------------------------------

    def _expire(self) -> list[str]:
        """Forget responses idle past the TTL (a bounded number a call), and collect stranded rows."""
        ended = []
        for row in self._idle(self.clock() - self.ttl, MAX_FORGOTTEN_PER_CALL):
            ended += self._forget(row)
        for row in self._stranded(MAX_SWEPT_PER_CALL):
            self._drop_unneeded(row)
        return ended

    def _victim(self, spare: str) -> Row:
        """The least recently used kept response of the tenant with the largest share."""
        def load(tenant: str | None) -> float:
            kept, size = shares[tenant]
            return max(kept / self.max_responses, size / self.max_bytes)

        shares = self._shares()
        for tenant in sorted(shares, key=load, reverse=True):
            for row in self._least_recent(tenant, 2):
                if row.id != spare:
                    return row
        raise AssertionError("a full store keeps a response besides the one just added")

    def _forget(self, row: Row) -> list[str]:
        """A kept response leaves the index: unkept, then dropped with every ancestor that no
        row needs any more; its chain's session ends when the chain has no kept response."""
        row.kept = False
        self._update_kept(row)
        self._drop_unneeded(row)
        if row.session_id is not None and not self._chain_has_kept(row.root_id):
            self._pop_head(row.session_id, None)
            return [row.session_id]
        return []

    def _drop_unneeded(self, row: Row) -> None:
        """Delete an unkept row that no row continues, then its ancestors that became so."""
        node: Row | None = row
        while node is not None and not node.kept and not self._has_children(node.id):
            self._delete(node)
            node = self._load(node.parent_id) if node.parent_id is not None else None

    def _node(self, row: Row) -> StoredResponse:
        """A response with its history, as StoredResponse objects."""
        rows = [row]
        while rows[-1].parent_id is not None:
            parent = self._load(rows[-1].parent_id)
            if parent is None:  # cannot happen while rows are kept consistently; an end to the walk if it does
                break
            rows.append(parent)
        chain = Chain(row.session_id)
        node = None
        for stored in reversed(rows):
            node = StoredResponse(stored.id, stored.tenant, chain, node,
                                  tuple(tuple(item) for item in stored.input_items), stored.instructions,
                                  stored.output_text, stored.message_id, stored.fields)
        return node

    def _row(self, node: StoredResponse, kept: bool, last_used: float = 0.0) -> Row:
        root = node
        while root.parent is not None:
            root = root.parent
        return Row(node.id, node.tenant, node.parent.id if node.parent is not None else None, root.id,
                   node.chain.session_id, [list(item) for item in node.input_items], node.instructions,
                   node.output_text, node.message_id, node.fields, node.size, last_used, kept)

    def _set_head(self, session: str, response_id: str) -> None:
        with self._heads_lock:
            self._heads[session] = response_id
            self._heads.move_to_end(session)
            while len(self._heads) > _MAX_HEADS:
                self._heads.popitem(last=False)

    def _pop_head(self, session: str, response_id: str | None) -> bool:
        """Forget a session's head (only if it is `response_id`, unless that is None): whether it was."""
        with self._heads_lock:
            if session in self._heads and response_id in (None, self._heads[session]):
                del self._heads[session]
                return True
            return False

    # -- the backend -----------------------------------------------------------------------

    @abstractmethod
    def _transaction(self) -> AbstractContextManager:
        """One transaction over the backend, exclusive among every process that shares it."""

    @abstractmethod
    def _load(self, response_id: str) -> Row | None: ...

    @abstractmethod
    def _insert(self, row: Row) -> None: ...

    @abstractmethod
    def _touch(self, row: Row) -> None:
        """Store row.last_used."""

    @abstractmethod
    def _update_kept(self, row: Row) -> None:
        """Store row.kept."""

    @abstractmethod
    def _delete(self, row: Row) -> None: ...

    @abstractmethod
    def _has_children(self, response_id: str) -> bool: ...

    @abstractmethod
    def _chain_has_kept(self, root_id: str) -> bool: ...

    @abstractmethod
    def _num_kept(self) -> int: ...

    @abstractmethod
    def _num_bytes(self) -> int:
        """The size of every row (kept, or needed by a kept one)."""

    @abstractmethod
    def _shares(self) -> dict[str | None, tuple[int, int]]:
        """Per tenant with kept responses: (kept responses, bytes of its rows)."""

    @abstractmethod
    def _least_recent(self, tenant: str | None, count: int) -> list[Row]:
        """The tenant's `count` least recently used kept rows."""

    @abstractmethod
    def _idle(self, before: float, limit: int) -> Iterator[Row]:
        """Kept rows last used before `before`, least recent first, `limit` at most."""

    @abstractmethod
    def _stranded(self, limit: int) -> list[Row]:
        """Unkept rows that no row names as parent (left by a method that failed halfway), `limit` at most."""
