"""The compiled programs a scheduler configuration can call, as a finite set fixed by the configuration.

A program is compiled per shape, and on the full model each takes a minute or more; a request that
needs a new one stalls every stream. So the scheduler (runtime/scheduler.py) builds all of them
before it reports ready (`warm_up`), and only ever makes calls of those shapes:

    decode        per block-list length (`pages.block_buckets`): plain with and without logit
                  adjustments, and rich (logprobs, grammar masks);
    prefill       the model's program per (sequences, token columns, table width): sequences
                  bucketed by `batch_bucket` up to `max_prefill`, token columns by `chunk_bucket` up
                  to the prefill budget, where a call of more than the fewest sequences holds at
                  most the budget's bucket of token slots (`PrefillShapes.fits`: a call the budget
                  alone would allow but this does not is split in two), and table widths by
                  `pages.table_width`;
    first tokens  sampling per (sequences, rows): rows up to `max_batch` (the `n` samples of a
                  request share their sequence's prefill);
    page copy     per count of copied pages (rows sharing a sequence get their own pages), up to
                  what a budget's chunk spans for every row;
    counts        a resumed row's penalty counts, one program.

With the defaults (16 slots of 4,096 positions, `max_prefill` 4, a budget of 512, pages of 64) that is
21 decode, 36 prefill, 12 sampling, 5 logprobs, 9 copy and 1 count program; the persistent compile
cache (runtime/compile_cache.py) makes every later start of the same configuration load them.
"""

from __future__ import annotations

import dataclasses

from kimi_jax.runtime.pages import pages_for, table_width
from kimi_jax.runtime.requests import batch_bucket, chunk_bucket


@dataclasses.dataclass(frozen=True)
class PrefillShapes:
    """The prefill programs of a scheduler: `max_prefill` distinct sequences and `max_rows` rows a call
    at most, a budget of `chunk` tokens a call, page tables of up to `pages_per_seq` pages of
    `page_size`, the batch split over `shards`."""

    max_prefill: int
    max_rows: int
    chunk: int
    page_size: int
    pages_per_seq: int
    shards: int = 1

    def rows(self, n: int) -> int:
        """The batch bucket of n sequences or rows."""
        return batch_bucket(n, self.shards)

    def allowed(self, sequences: int, tokens: int) -> bool:
        """Whether a call of `sequences` × `tokens` (both bucketed) is one of the programs: the fewest
        sequences take any chunk; more hold at most the budget's bucket of token slots."""
        return sequences == self.rows(1) or sequences * tokens <= batch_bucket(self.chunk)

    def fits(self, sequences: int, longest: int) -> bool:
        """Whether a call of `sequences` distinct chunks, the longest of `longest` tokens, is allowed."""
        return self.allowed(self.rows(sequences), chunk_bucket(longest))

    def chunks(self) -> list[tuple[int, int]]:
        """Every (sequences, token columns) of the model's prefill program."""
        seqs = sorted({self.rows(n) for n in range(1, min(self.max_prefill, self.max_rows) + 1)})
        tokens = sorted({chunk_bucket(n) for n in _powers_up_to(self.chunk)})
        return [(u, t) for u in seqs for t in tokens if self.allowed(u, t)]

    def widths(self) -> list[int]:
        """Every page-table width of a prefill call (`pages.table_width`)."""
        return sorted({table_width(p, self.page_size, self.pages_per_seq) for p in _powers_up_to(self.pages_per_seq)})

    def samples(self) -> list[tuple[int, int]]:
        """Every (sequences, rows) of the first-token sampling program."""
        seqs = {u for u, _ in self.chunks()}
        rows = {self.rows(n) for n in range(1, self.max_rows + 1)}
        return sorted((u, b) for u in seqs for b in rows if b >= u)

    def copies(self) -> list[int]:
        """Every page-copy count: up to every row but one copying what a chunk spans (its pages, and one
        more where it starts mid-page)."""
        most = (self.max_rows - 1) * (pages_for(self.chunk, self.page_size) + 1)
        return sorted({batch_bucket(n) for n in _powers_up_to(most)}) if most > 0 else []


def _powers_up_to(n: int) -> list[int]:
    """1, 2, 4, … below n, and n: one value in each power-of-two bucket up to n's."""
    out = [1]
    while out[-1] * 2 < n:
        out.append(out[-1] * 2)
    return out + [n] if n > 1 else out
