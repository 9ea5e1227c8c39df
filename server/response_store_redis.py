"""Stored responses in Redis (`--response-store redis://HOST:PORT/DB`): for replicas on several
hosts, any of which can continue any chain. Every store method runs under one Redis lock
(`<prefix>:lock`, redis-py's `Lock`), so replicas never interleave their bounds' bookkeeping.
The policy is server/response_store_shared.py's; needs the `redis` package
(`pip install 'sinkserve[redis]'`).

Keys, under the prefix `sinkserve:responses`:
- `row:<id>`: a hash of the row's JSON (`body`), `last_used` and `kept`;
- `lru`: the kept ids by last use (a sorted set), and `lru:<tenant>` per API key;
- `children:<id>`: rows naming <id> as parent; `chain:<root id>`: kept rows of a chain;
- `bytes`: a hash of each tenant's row bytes;
- `unkept`: the ids of unkept rows (history that kept rows continue).

Each write of a method is one MULTI/EXEC pipeline; a method that fails between two of them is
mended by the next ones (server/response_store_shared.py).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from server.response_store_shared import Row, SharedResponseStore

PREFIX = "sinkserve:responses"
# Seconds a method waits for another replica's to finish before it fails, and the most a holder
# may keep the lock (a replica that dies holding it frees it then).
_BUSY_TIMEOUT = 10.0
_LOCK_TIMEOUT = 30.0


def _tenant_key(tenant: str | None) -> str:
    return "-" if tenant is None else f"k:{tenant}"


def _tenant_of(key: str) -> str | None:
    return None if key == "-" else key[2:]


class RedisResponseStore(SharedResponseStore):
    def __init__(self, url: str, *bounds, **options):
        super().__init__(*bounds, **options)
        try:
            import redis
        except ImportError:
            raise ValueError("--response-store redis:// needs the redis package: pip install 'sinkserve[redis]'") \
                from None
        self._redis = redis.Redis.from_url(url, socket_timeout=_BUSY_TIMEOUT, socket_connect_timeout=5.0)
        try:
            self._redis.ping()
        except redis.RedisError as exc:
            raise ValueError(f"--response-store {url}: cannot reach Redis: {exc}") from None
        self.description = f"in Redis at {url} (shared by every replica that names it)"
        self._thread_lock = threading.Lock()
        self._lock = self._redis.lock(f"{PREFIX}:lock", timeout=_LOCK_TIMEOUT, blocking_timeout=_BUSY_TIMEOUT,
                                      thread_local=False)

    def close(self) -> None:
        self._redis.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._thread_lock:
            if not self._lock.acquire():
                raise TimeoutError(f"the response store's lock was held for over {_BUSY_TIMEOUT} s")
            try:
                yield
            finally:
                self._lock.release()

    def _key(self, *parts: str) -> str:
        return ":".join((PREFIX, *parts))

    def _rows(self, ids) -> list[Row]:
        pipe = self._redis.pipeline(transaction=False)
        for response_id in ids:
            pipe.hmget(self._key("row", _decode(response_id)), "body", "last_used", "kept")
        rows = []
        for body, last_used, kept in pipe.execute():
            if body is not None:
                row = Row.from_json(body)
                row.last_used, row.kept = float(last_used), kept == b"1"
                rows.append(row)
        return rows

    def _load(self, response_id: str) -> Row | None:
        rows = self._rows([response_id])
        return rows[0] if rows else None

    def _insert(self, row: Row) -> None:
        pipe = self._redis.pipeline()
        pipe.hset(self._key("row", row.id), mapping={"body": row.to_json(), "last_used": repr(row.last_used),
                                                     "kept": "1" if row.kept else "0"})
        if row.parent_id is not None:
            pipe.incr(self._key("children", row.parent_id))
        if row.kept:
            self._index(pipe, row)
        else:
            pipe.sadd(self._key("unkept"), row.id)
        pipe.hincrby(self._key("bytes"), _tenant_key(row.tenant), row.size)
        pipe.execute()

    def _index(self, pipe, row: Row) -> None:
        pipe.zadd(self._key("lru"), {row.id: row.last_used})
        pipe.zadd(self._key("lru", _tenant_key(row.tenant)), {row.id: row.last_used})
        pipe.incr(self._key("chain", row.root_id))

    def _touch(self, row: Row) -> None:
        pipe = self._redis.pipeline()
        pipe.hset(self._key("row", row.id), "last_used", repr(row.last_used))
        pipe.zadd(self._key("lru"), {row.id: row.last_used})
        pipe.zadd(self._key("lru", _tenant_key(row.tenant)), {row.id: row.last_used})
        pipe.execute()

    def _update_kept(self, row: Row) -> None:
        pipe = self._redis.pipeline()
        pipe.hset(self._key("row", row.id), "kept", "1" if row.kept else "0")
        if row.kept:
            self._index(pipe, row)
            pipe.srem(self._key("unkept"), row.id)
        else:
            pipe.zrem(self._key("lru"), row.id)
            pipe.zrem(self._key("lru", _tenant_key(row.tenant)), row.id)
            pipe.decr(self._key("chain", row.root_id))
            pipe.sadd(self._key("unkept"), row.id)
        pipe.execute()

    def _delete(self, row: Row) -> None:
        pipe = self._redis.pipeline()
        pipe.delete(self._key("row", row.id), self._key("children", row.id))
        pipe.srem(self._key("unkept"), row.id)
        if row.parent_id is not None:
            pipe.decr(self._key("children", row.parent_id))
        pipe.hincrby(self._key("bytes"), _tenant_key(row.tenant), -row.size)
        pipe.execute()
        if self._redis.hget(self._key("bytes"), _tenant_key(row.tenant)) in (b"0", None):
            self._redis.hdel(self._key("bytes"), _tenant_key(row.tenant))
        chain = self._key("chain", row.root_id)
        if self._redis.get(chain) in (b"0", None):
            self._redis.delete(chain)

    def _has_children(self, response_id: str) -> bool:
        return int(self._redis.get(self._key("children", response_id)) or 0) > 0

    def _chain_has_kept(self, root_id: str) -> bool:
        return int(self._redis.get(self._key("chain", root_id)) or 0) > 0

    def _num_kept(self) -> int:
        return self._redis.zcard(self._key("lru"))

    def _num_bytes(self) -> int:
        return sum(int(size) for size in self._redis.hvals(self._key("bytes")))

    def _shares(self) -> dict[str | None, tuple[int, int]]:
        sizes = {_decode(key): int(size) for key, size in self._redis.hgetall(self._key("bytes")).items()}
        pipe = self._redis.pipeline(transaction=False)  # one round trip for every tenant
        for key in sizes:
            pipe.zcard(self._key("lru", key))
        return {_tenant_of(key): (kept, size) for (key, size), kept in zip(sizes.items(), pipe.execute()) if kept}

    def _least_recent(self, tenant: str | None, count: int) -> list[Row]:
        return self._rows(self._redis.zrange(self._key("lru", _tenant_key(tenant)), 0, count - 1))

    def _idle(self, before: float, limit: int) -> Iterator[Row]:
        return iter(self._rows(self._redis.zrangebyscore(self._key("lru"), "-inf", f"({before!r}", start=0,
                                                         num=limit)))

    def _stranded(self, limit: int) -> list[Row]:
        ids = [_decode(response_id) for response_id in self._redis.srandmember(self._key("unkept"), limit)]
        rows = self._rows(ids)
        if gone := set(ids) - {row.id for row in rows}:
            self._redis.srem(self._key("unkept"), *gone)
        return [row for row in rows if not row.kept and not self._has_children(row.id)]


def _decode(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
