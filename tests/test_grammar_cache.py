"""scheduler/grammar_cache.py: bounded by entries and bytes, evicting from the tenant with the
largest share first."""

from __future__ import annotations

import pytest

from scheduler.grammar_cache import GrammarCache


def test_a_flooding_tenant_evicts_its_own_entries():
    cache = GrammarCache(max_entries=4, max_bytes=10**9)
    cache.put("a1", "A", "tenant-a", 10)
    for i in range(20):
        cache.put(f"b{i}", "B", "tenant-b", 10)
    assert cache.get("a1") == "A" and len(cache) == 4
    assert [key for key in (f"b{i}" for i in range(20)) if cache.get(key)] == ["b17", "b18", "b19"]


def test_bytes_are_bounded_and_the_largest_share_by_bytes_goes_first():
    cache = GrammarCache(max_entries=100, max_bytes=100)
    for i in range(5):
        cache.put(f"a{i}", i, "small", 2)  # 5 entries, 10 bytes
    cache.put("b0", "big", "large", 60)
    cache.put("b1", "big", "large", 60)  # over the byte bound: "large" holds 120 of 130 bytes
    assert cache.num_bytes <= 100
    assert cache.get("b0") is None and cache.get("b1") == "big"
    assert all(cache.get(f"a{i}") == i for i in range(5))
    assert cache.tenant_bytes("large") == 60 and cache.tenant_bytes("small") == 10


def test_an_entry_larger_than_the_whole_cache_is_not_kept_and_use_keeps_an_entry():
    cache = GrammarCache(max_entries=2, max_bytes=50)
    cache.put("x", 1, None, 10)
    cache.put("huge", 2, None, 80)
    assert cache.get("huge") is None and cache.get("x") == 1 and cache.num_bytes == 10
    cache.put("y", 3, None, 10)
    assert cache.get("x") == 1  # now the most recently used
    cache.put("z", 4, None, 10)
    assert cache.get("y") is None and cache.get("x") == 1 and cache.get("z") == 4
    cache.put("x", 5, None, 20)  # replaced, counted once
    assert cache.get("x") == 5 and cache.num_bytes == 30 and len(cache) == 2


def test_bounds_must_be_positive():
    with pytest.raises(ValueError):
        GrammarCache(max_entries=0, max_bytes=1)
