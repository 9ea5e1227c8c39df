"""Stored responses in an SQLite file (`--response-store PATH`, the default): they survive a
restart, and the servers of one host that name the same file share them (WAL mode: readers do
not wait for the writer; every store method is one `BEGIN IMMEDIATE` transaction, so two
servers never interleave their bounds' bookkeeping). The policy is server/response_store_shared.py's.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator

from server.response_store_shared import Row, SharedResponseStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    tenant TEXT,            -- NULL: a server without API keys
    parent_id TEXT,
    root_id TEXT NOT NULL,
    session_id TEXT,
    body TEXT NOT NULL,     -- the row's JSON (server/response_store_shared.py, Row)
    size INTEGER NOT NULL,
    last_used REAL NOT NULL,
    kept INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_parent ON responses (parent_id);
CREATE INDEX IF NOT EXISTS responses_root_kept ON responses (root_id, kept);
CREATE INDEX IF NOT EXISTS responses_kept_lru ON responses (kept, last_used);
CREATE INDEX IF NOT EXISTS responses_tenant_lru ON responses (tenant, kept, last_used);
"""
# Seconds a transaction waits for another server's to finish before it fails.
_BUSY_TIMEOUT = 10.0


class SQLiteResponseStore(SharedResponseStore):
    def __init__(self, path: str, *bounds, **options):
        super().__init__(*bounds, **options)
        self.path = os.path.abspath(os.path.expanduser(path))
        self.description = f"in {self.path} (SQLite: kept across restarts, shared by the servers of this host)"
        # Stored responses are every API key's prompts and replies: the folder and the file (and
        # SQLite's -wal and -shm files, which take the file's mode) are the server user's alone.
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        self._lock = threading.Lock()  # one connection, used by one thread at a time
        self._db = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
        with self._transaction():
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._db.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, query: str, *args) -> list[Row]:
        rows = []
        for body, last_used, kept in self._db.execute(query, args):
            row = Row.from_json(body)
            row.last_used, row.kept = last_used, bool(kept)
            rows.append(row)
        return rows

    def _load(self, response_id: str) -> Row | None:
        rows = self._rows("SELECT body, last_used, kept FROM responses WHERE id = ?", response_id)
        return rows[0] if rows else None

    def _insert(self, row: Row) -> None:
        self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (row.id, row.tenant, row.parent_id, row.root_id, row.session_id, row.to_json(), row.size,
                          row.last_used, int(row.kept)))

    def _touch(self, row: Row) -> None:
        self._db.execute("UPDATE responses SET last_used = ? WHERE id = ?", (row.last_used, row.id))

    def _update_kept(self, row: Row) -> None:
        self._db.execute("UPDATE responses SET kept = ? WHERE id = ?", (int(row.kept), row.id))

    def _delete(self, row: Row) -> None:
        self._db.execute("DELETE FROM responses WHERE id = ?", (row.id,))

    def _has_children(self, response_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM responses WHERE parent_id = ? LIMIT 1", (response_id,)).fetchone() \
            is not None

    def _chain_has_kept(self, root_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM responses WHERE root_id = ? AND kept = 1 LIMIT 1",
                                (root_id,)).fetchone() is not None

    def _num_kept(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM responses WHERE kept = 1").fetchone()[0]

    def _num_bytes(self) -> int:
        return self._db.execute("SELECT COALESCE(SUM(size), 0) FROM responses").fetchone()[0]

    def _shares(self) -> dict[str | None, tuple[int, int]]:
        return {tenant: (kept, size) for tenant, kept, size in self._db.execute(
            "SELECT tenant, SUM(kept), SUM(size) FROM responses GROUP BY tenant HAVING SUM(kept) > 0")}

    def _least_recent(self, tenant: str | None, count: int) -> list[Row]:
        return self._rows("SELECT body, last_used, kept FROM responses WHERE tenant IS ? AND kept = 1 "
                          "ORDER BY last_used LIMIT ?", tenant, count)

    def _idle(self, before: float, limit: int) -> Iterator[Row]:
        return iter(self._rows("SELECT body, last_used, kept FROM responses WHERE kept = 1 AND last_used < ? "
                               "ORDER BY last_used LIMIT ?", before, limit))

    def _stranded(self, limit: int) -> list[Row]:
        return []  # a method is one SQLite transaction: it commits whole or not at all
