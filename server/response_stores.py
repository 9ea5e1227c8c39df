"""The response store `--response-store` names (server/response_store.py has the interface and
the in-memory store; the backends import it, and this module imports them)."""

from __future__ import annotations

import os

from server.defaults import (DEFAULT_MAX_CHAIN_TOKENS, DEFAULT_MAX_STORED_RESPONSES, DEFAULT_RESPONSE_STORE_BYTES,
                             DEFAULT_RESPONSE_TTL)
from server.response_store import MemoryResponseStore, ResponseStore
from server.response_store_redis import RedisResponseStore
from server.response_store_sqlite import SQLiteResponseStore


def default_response_store_path() -> str:
    """Where `--response-store` keeps responses by default: under $XDG_STATE_HOME (~/.local/state)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "sinkserve", "responses.sqlite3")


def open_response_store(spec: str, max_responses: int = DEFAULT_MAX_STORED_RESPONSES,
                        ttl: float = DEFAULT_RESPONSE_TTL, max_bytes: int = DEFAULT_RESPONSE_STORE_BYTES,
                        max_chain_tokens: int = DEFAULT_MAX_CHAIN_TOKENS) -> ResponseStore:
    """The store `--response-store` names: "memory", a redis:// or rediss:// URL, or the path of
    an SQLite file (created with its directory)."""
    if spec == "memory":
        return MemoryResponseStore(max_responses, ttl, max_bytes, max_chain_tokens)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisResponseStore(spec, max_responses, ttl, max_bytes, max_chain_tokens)
    return SQLiteResponseStore(spec, max_responses, ttl, max_bytes, max_chain_tokens)
