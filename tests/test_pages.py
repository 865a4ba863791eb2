"""The host-side page allocator and prefix index (runtime/pages.py): plain Python, no model."""

import pytest

from kimi_jax.runtime.pages import PagePool, PagesExhausted, page_keys, pages_for

pytestmark = pytest.mark.unit


def test_allocate_release_and_exhaustion():
    pool = PagePool(4, 8, prefix_cache=False)
    a = pool.allocate(3)
    assert a == [0, 1, 2] and pool.used == 3 and pool.free == 1  # lowest ids first: deterministic
    with pytest.raises(PagesExhausted, match="2 pages asked for, 1 available of 4"):
        pool.allocate(2)
    assert pool.used == 3  # a failed allocation takes nothing
    pool.release(a[:2])
    assert pool.available == 3 and pool.allocate(3) == [1, 0, 3]
    with pytest.raises(ValueError, match="page 2 released more often"):
        pool.release([2, 2])


def test_pages_for_and_keys_chain_over_everything_before():
    assert [pages_for(n, 4) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]
    a, b = page_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], 4), page_keys([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and len(b) == 2  # full pages only
    assert a[0] != b[0] and a[1] != b[1]  # the same second page after a different first one: another key
    assert page_keys([1, 2, 3, 4, 5, 6, 7, 8, 0], 4) == a


def test_prefix_hits_are_shared_and_cached_after_release():
    pool = PagePool(6, 4)
    seq = list(range(10))  # two full pages and a partial one
    pages = pool.allocate(3)
    assert pool.match(seq) == []  # nothing registered before it is written
    pool.register(seq, pages, written=10)
    assert pool.match(seq) == pages[:2] and pool.match(seq, limit=1) == pages[:1]
    assert pool.match([0, 1, 2, 3, 9, 9, 9, 9]) == pages[:1]  # the hit stops at the first differing page
    pool.acquire(pages[:2])  # a second sequence shares the two full pages
    assert pool.refs(pages[0]) == 2
    pool.release(pages)  # the first ends: its partial page is freed, the full ones still held
    assert pool.cached == 0 and pool.free == 4
    pool.release(pages[:2])  # the second ends: the full pages stay cached, still available
    assert pool.cached == 2 and pool.available == 6 and pool.used == 0
    assert pool.cached_among(pages) == 2
    pool.acquire(pool.match(seq))  # reused from the LRU list
    assert pool.cached == 0 and pool.used == 2


def test_eviction_takes_the_least_recently_used_page_only_when_nothing_is_free():
    pool = PagePool(3, 2)
    first, second = [1, 2], [3, 4]
    for seq in (first, second):
        page = pool.allocate(1)
        pool.register(seq, page, written=2)
        pool.release(page)
    assert pool.cached == 2 and pool.free == 1
    assert pool.allocate(1) == [2] and pool.evictions == 0  # a free page before any cached one
    pool.acquire(pool.match(first))  # `first` used again: now the most recent
    pool.release(pool.match(first))
    evicted = pool.allocate(1)
    assert pool.evictions == 1 and pool.match(second) == [] and pool.match(first) != []
    assert evicted == [1]  # `second`'s page, reused


def test_partly_written_pages_are_not_registered():
    """Only what is on the device counts: a page is registered once all its tokens are written."""
    pool = PagePool(4, 4)
    seq = list(range(12))
    pages = pool.allocate(3)
    pool.register(seq, pages, written=7)  # e.g. a sequence cancelled after 7 positions
    assert pool.match(seq) == pages[:1]
    pool.release(pages)
    assert pool.cached == 1 and pool.free == 3


def test_off_registers_nothing():
    pool = PagePool(2, 2, prefix_cache=False)
    page = pool.allocate(1)
    pool.register([1, 2], page, written=2)
    pool.release(page)
    assert pool.match([1, 2, 3]) == [] and pool.free == 2
    with pytest.raises(ValueError, match="holds no registered prefix"):
        pool.acquire(page)
