from __future__ import annotations

from serving.cache import LRUCache


def test_lru_keeps_the_most_recently_used_and_computes_each_miss_once():
    calls: list[str] = []
    cache: LRUCache[str] = LRUCache(2)

    def get(key):
        return cache.get_or_compute(key, lambda: calls.append(key) or key.upper())

    assert [get("a"), get("b"), get("a"), get("c")] == ["A", "B", "A", "C"]
    assert calls == ["a", "b", "c"]          # "a" was a hit the second time
    assert get("a") == "A" and get("b") == "B"
    assert calls == ["a", "b", "c", "b"]     # "b" was evicted (least recently used)
    assert len(cache) == 2
