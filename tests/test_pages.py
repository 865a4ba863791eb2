"""The host-side page allocator and prefix index (runtime/pages.py): plain Python, no model."""

import numpy as np
import pytest

from kimi_jax.runtime.pages import (
    PagePool,
    PagesExhausted,
    block_buckets,
    decode_blocks,
    page_keys,
    pages_for,
    table_width,
)

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


def test_decode_blocks_list_each_rows_pages_in_runs():
    """Pages of 64 positions in blocks of 4 pages (256 positions): row 0's 5 pages are two blocks (the
    second padded with −1), row 2's one page a third; the list is padded to 4 with out-of-range rows."""
    blocks = decode_blocks({0: [10, 11, 12, 13, 14], 2: [7]}, page_size=64, rows=3)
    assert blocks.rows.tolist() == [0, 0, 2, 3]
    assert blocks.pages.tolist() == [[10, 11, 12, 13], [14, -1, -1, -1], [7, -1, -1, -1], [-1] * 4]
    assert blocks.starts.tolist() == [0, 256, 0, 0]


def test_every_decode_block_list_length_is_a_warm_up_bucket():
    """Whatever the rows hold (up to a whole sequence each), the list's length is one of block_buckets,
    the programs the scheduler's warm-up builds."""
    rng = np.random.default_rng(0)
    buckets = block_buckets(rows=4, pages_per_seq=16, page_size=64)
    assert buckets == [4, 8, 16]
    for _ in range(200):
        held = {r: list(range(int(rng.integers(0, 17)))) for r in range(4) if rng.random() < 0.8}
        assert len(decode_blocks(held, 64, 4).rows) in buckets
    assert block_buckets(rows=2, pages_per_seq=100, page_size=16) == [4, 8, 16]  # 7 blocks of 16 pages a row


def test_table_width_is_bucketed_and_capped():
    assert table_width(1, page_size=64, pages_per_seq=64) == 16  # at least 1,024 positions
    assert table_width(17, page_size=64, pages_per_seq=64) == 32
    assert table_width(40, page_size=64, pages_per_seq=48) == 48  # never past a whole sequence
