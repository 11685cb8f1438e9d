from __future__ import annotations

import pytest

from service.router.cache import LRUCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_get_put_and_lru_eviction() -> None:
    cache: LRUCache[int] = LRUCache(max_entries=2, ttl_s=60)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now most recent
    cache.put("c", 3)  # evicts b
    assert cache.get("b") is None
    assert cache.get("a") == 1
    assert cache.get("c") == 3
    assert len(cache) == 2


def test_ttl_expiry() -> None:
    clock = Clock()
    cache: LRUCache[str] = LRUCache(max_entries=10, ttl_s=5, clock=clock)
    cache.put("k", "v")
    clock.now = 4.9
    assert cache.get("k") == "v"
    clock.now = 5.0
    assert cache.get("k") is None
    assert len(cache) == 0


def test_put_refreshes_ttl_and_clear_empties() -> None:
    clock = Clock()
    cache: LRUCache[str] = LRUCache(max_entries=10, ttl_s=5, clock=clock)
    cache.put("k", "v1")
    clock.now = 4
    cache.put("k", "v2")
    clock.now = 8
    assert cache.get("k") == "v2"
    cache.clear()
    assert cache.get("k") is None


def test_size_zero_disables() -> None:
    cache: LRUCache[int] = LRUCache(max_entries=0, ttl_s=5)
    cache.put("k", 1)
    assert cache.get("k") is None


@pytest.mark.parametrize(("size", "ttl"), [(-1, 5), (1, 0)])
def test_rejects_bad_limits(size: int, ttl: float) -> None:
    with pytest.raises(ValueError):
        LRUCache(max_entries=size, ttl_s=ttl)
