"""Host-side bookkeeping of the paged latent cache: which page holds what, and who holds it.

The device holds a pool of `num_pages` pages of `page_size` token positions per layer
(model/paged.py); a sequence's page table lists its pages in order, so position p lives at
offset p % page_size of page table[p // page_size]. This module decides which page ids a
sequence gets. It is plain Python with no clock and no randomness: every process of a multi-host
server (runtime/lockstep.py) runs the same calls in the same order and so takes the same decisions.

Automatic prefix caching: a *full* page is content-addressed by a digest chained over its tokens
and every token before them (`page_keys`), so two sequences share a page only when their whole
prefix up to the page's end is the same. A page is registered only after its contents are on the
device (the caller registers what it has written), never when it is allocated, so a sequence that
is cancelled or fails before writing leaves nothing another could reuse. Registered pages whose
last holder ends stay in an LRU list; they are reused on a hit and evicted (oldest first) when the
free list is empty.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import numpy as np

from kimi_jax.model.paged import Blocks
from kimi_jax.runtime.requests import batch_bucket

KEY_BYTES = 16  # blake2b digest size: 128 bits, a collision is not a practical concern
MIN_TABLE_POSITIONS = 1024  # shorter page tables are not worth a compiled program of their own
# Decode reads the rows' pages as blocks of this many positions (model/paged.py): a row pays at most
# one block's padding, and a block's softmax statistics ([heads, kv_lora] f32) stay small beside its keys.
BLOCK_POSITIONS = 256
MIN_BLOCKS = 4  # the fewest blocks a decode call's list is padded to (then powers of two: few programs)


class PagesExhausted(RuntimeError):
    """Fewer pages are free (or evictable) than asked for."""


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold `tokens` positions."""
    return -(-tokens // page_size)


def page_keys(tokens: Sequence[int], page_size: int) -> list[bytes]:
    """The content keys of the full pages of `tokens`: key i digests key i−1 and page i's tokens."""
    keys, parent = [], b""
    ids = np.asarray(tokens[:len(tokens) // page_size * page_size], np.int64)  # fixed width: one encoding
    for i in range(len(ids) // page_size):
        parent = hashlib.blake2b(parent + ids[i * page_size:(i + 1) * page_size].tobytes(),
                                 digest_size=KEY_BYTES).digest()
        keys.append(parent)
    return keys


class PagePool:
    """Page ids 0..num_pages−1: a free list, a reference count per page, and (with `prefix_cache`) the
    registered pages by content key with an LRU list of those nobody holds.

    A page is in exactly one of: free; held (refs > 0, registered or not); cached (refs == 0,
    registered, in the LRU list). `available` counts free plus cached pages: what `allocate` can give.
    """

    def __init__(self, num_pages: int, page_size: int, prefix_cache: bool = True):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"a page pool needs num_pages ≥ 1 and page_size ≥ 1, got {num_pages} and {page_size}")
        self.num_pages, self.page_size, self.prefix_cache = num_pages, page_size, prefix_cache
        self._free = list(range(num_pages - 1, -1, -1))  # popped from the end: lowest id first
        self._refs = [0] * num_pages
        self._by_key: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # oldest first
        self.evictions = 0

    # Counts -------------------------------------------------------------------------------------
    @property
    def free(self) -> int:
        """Pages holding nothing."""
        return len(self._free)

    @property
    def cached(self) -> int:
        """Pages nobody holds that keep a reusable prefix."""
        return len(self._lru)

    @property
    def available(self) -> int:
        """Pages `allocate` can hand out now (free ones first, then cached ones, evicted)."""
        return len(self._free) + len(self._lru)

    @property
    def used(self) -> int:
        """Pages held by some sequence."""
        return self.num_pages - self.available

    def refs(self, page: int) -> int:
        return self._refs[page]

    # Allocation ---------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """`n` fresh pages for one holder; raises PagesExhausted (taking none) if fewer are available."""
        if n > self.available:
            raise PagesExhausted(f"{n} pages asked for, {self.available} available of {self.num_pages}")
        out = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:  # evict the least recently used cached prefix page
                page, _ = self._lru.popitem(last=False)
                del self._by_key[self._key_of.pop(page)]
                self.evictions += 1
            self._refs[page] = 1
            out.append(page)
        return out

    def release(self, pages: Sequence[int]) -> None:
        """Drop one hold on each page; an unheld page is cached if registered, else freed."""
        for page in pages:
            if self._refs[page] <= 0:
                raise ValueError(f"page {page} released more often than it was held")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._key_of:
                    self._lru[page] = None  # most recently used last
                else:
                    self._free.append(page)

    # Prefix cache -------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int], limit: int | None = None) -> list[int]:
        """The registered pages that hold the longest run of `tokens`' full pages from the start (at
        most `limit` pages). Takes no hold: see `acquire`."""
        if not self.prefix_cache:
            return []
        hit = []
        for key in page_keys(tokens, self.page_size)[:limit]:
            page = self._by_key.get(key)
            if page is None:
                break
            hit.append(page)
        return hit

    def cached_among(self, pages: Sequence[int]) -> int:
        """How many of `pages` are cached (unheld): acquiring them makes `available` drop by that many."""
        return sum(page in self._lru for page in pages)

    def acquire(self, pages: Sequence[int]) -> None:
        """Hold registered pages (a prefix hit) for one more sequence."""
        for page in pages:
            if page not in self._key_of:
                raise ValueError(f"page {page} holds no registered prefix; it cannot be shared")
            self._lru.pop(page, None)
            self._refs[page] += 1

    def register(self, tokens: Sequence[int], pages: Sequence[int], written: int) -> None:
        """Record that `pages` (a sequence's table, in order) hold `tokens[:written]` on the device, so
        that its full pages can be reused. A key already registered keeps its first page."""
        if not self.prefix_cache:
            return
        for key, page in zip(page_keys(tokens[:written], self.page_size), pages):
            if key not in self._by_key and page not in self._key_of:
                self._by_key[key], self._key_of[page] = page, key


def table_width(pages: int, page_size: int, pages_per_seq: int) -> int:
    """Page-table columns for a call whose longest row holds `pages` pages: a power of two (few
    programs) of at least MIN_TABLE_POSITIONS positions, and at most a whole sequence's table, so
    attention reads about as far as the longest row might use and no further."""
    return min(batch_bucket(max(pages, MIN_TABLE_POSITIONS // page_size, 1)), pages_per_seq)


def pages_per_block(page_size: int) -> int:
    """Pages in one decode key block (BLOCK_POSITIONS positions, at least one page)."""
    return max(1, BLOCK_POSITIONS // page_size)


def block_buckets(rows: int, pages_per_seq: int, page_size: int) -> list[int]:
    """Every length `decode_blocks` can give a batch of `rows` rows of at most `pages_per_seq` pages:
    the powers of two from MIN_BLOCKS to what every row at full length needs."""
    most = rows * -(-pages_per_seq // pages_per_block(page_size))
    sizes = [MIN_BLOCKS]
    while sizes[-1] < most:
        sizes.append(sizes[-1] * 2)
    return sizes


def decode_blocks(held: dict[int, list[int]], page_size: int, rows: int) -> Blocks:
    """The `Blocks` a decode call reads: the pages each row in `held` (row -> its page ids in position
    order) holds, in blocks of `pages_per_block`, the list's length bucketed (`block_buckets`)."""
    k = pages_per_block(page_size)
    count = sum(-(-len(pages) // k) for pages in held.values())
    return block_list(held, k, page_size, rows, batch_bucket(max(count, MIN_BLOCKS)))


def block_list(held: dict[int, list[int]], pages_per_block: int, page_size: int, rows: int, width: int) -> Blocks:
    """`held`'s pages in runs of `pages_per_block` as `Blocks`, padded to `width` blocks with padding
    rows (= `rows`, the batch: out of range)."""
    out_rows, out_pages, out_starts = [], [], []
    for row, pages in held.items():
        for i in range(0, len(pages), pages_per_block):
            run = pages[i:i + pages_per_block]
            out_rows.append(row)
            out_pages.append(run + [-1] * (pages_per_block - len(run)))
            out_starts.append(i * page_size)
    if len(out_rows) > width:
        raise ValueError(f"{len(out_rows)} key blocks do not fit a block list of {width}")
    pad = width - len(out_rows)
    return Blocks(np.array(out_rows + [rows] * pad, np.int32),
                  np.array(out_pages + [[-1] * pages_per_block] * pad, np.int32).reshape(width, pages_per_block),
                  np.array(out_starts + [0] * pad, np.int32))
