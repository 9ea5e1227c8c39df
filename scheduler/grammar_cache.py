"""Compiled grammars kept for reuse, bounded by entries and bytes and shared fairly between
tenants (API keys). Plain Python.

When the cache is over either bound, the tenant holding the largest share of it (its entries
over the entry bound, or its bytes over the byte bound, whichever is larger) gives up its least
recently used entry. So one key's flood of grammars evicts that key's own grammars first: a key
never loses an entry to another while it holds less than every other key.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, Hashable, TypeVar

Value = TypeVar("Value")


@dataclass
class _Share:
    entries: OrderedDict  # key -> None, least recently used first
    num_bytes: int = 0


class GrammarCache(Generic[Value]):
    def __init__(self, max_entries: int, max_bytes: int):
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be positive")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._values: dict[Hashable, tuple[Value, str | None, int]] = {}  # key -> (value, tenant, bytes)
        self._shares: dict[str | None, _Share] = {}
        self._lock = threading.Lock()  # used from server worker threads and the engine thread
        self.num_bytes = 0
        self.num_evicted = 0

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: Hashable) -> Value | None:
        with self._lock:
            item = self._values.get(key)
            if item is None:
                return None
            self._shares[item[1]].entries.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: Value, tenant: str | None, num_bytes: int) -> None:
        """Keep a value (replacing one under the same key), then evict down to the bounds, never
        the entry just added; one larger than the byte bound alone is not kept."""
        with self._lock:
            self._remove(key)
            if num_bytes > self.max_bytes:
                return
            share = self._shares.setdefault(tenant, _Share(OrderedDict()))
            share.entries[key] = None
            share.num_bytes += num_bytes
            self.num_bytes += num_bytes
            self._values[key] = (value, tenant, num_bytes)
            while len(self._values) > self.max_entries or self.num_bytes > self.max_bytes:
                victim = self._victim(spare=key)
                if victim is None:
                    break
                self._remove(victim)
                self.num_evicted += 1

    def tenant_bytes(self, tenant: str | None) -> int:
        share = self._shares.get(tenant)
        return share.num_bytes if share is not None else 0

    def _victim(self, spare: Hashable) -> Hashable | None:
        """The least recently used entry of the tenant with the largest share, not `spare`."""
        def load(share: _Share) -> float:
            return max(len(share.entries) / self.max_entries, share.num_bytes / self.max_bytes)

        for share in sorted(self._shares.values(), key=load, reverse=True):
            for key in share.entries:
                if key != spare:
                    return key
        return None

    def _remove(self, key: Hashable) -> None:
        item = self._values.pop(key, None)
        if item is None:
            return
        _, tenant, num_bytes = item
        share = self._shares[tenant]
        del share.entries[key]
        share.num_bytes -= num_bytes
        self.num_bytes -= num_bytes
        if not share.entries:
            del self._shares[tenant]
