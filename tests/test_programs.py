"""The finite set of programs a scheduler configuration can call (runtime/programs.py): every shape a
call can take is in the set the warm-up builds, for configurations other than the defaults too."""

import pytest

from kimi_jax.runtime.pages import block_buckets, pages_for, table_width
from kimi_jax.runtime.programs import PrefillShapes
from kimi_jax.runtime.requests import batch_bucket, chunk_bucket

pytestmark = pytest.mark.unit

CONFIGS = [  # max_prefill, max_rows, chunk, page_size, pages_per_seq, shards
    (4, 16, 512, 64, 64, 1),  # the serve defaults: 16 slots of 4,096 positions
    (1, 1, 32, 16, 4, 1),
    (3, 5, 100, 16, 20, 1),
    (8, 64, 2048, 64, 2048, 1),
    (4, 16, 512, 64, 64, 2),  # the batch split over 2 devices
]


@pytest.mark.parametrize("config", CONFIGS)
def test_every_call_the_scheduler_can_make_is_built(config):
    shapes = PrefillShapes(*config)
    max_prefill, max_rows, chunk, page_size, pages_per_seq, _ = config
    chunks, widths = set(shapes.chunks()), set(shapes.widths())
    for sequences in range(1, min(max_prefill, max_rows) + 1):
        for longest in range(1, chunk + 1):
            if shapes.fits(sequences, longest):  # what the scheduler's `_take` lets into one call
                assert (shapes.rows(sequences), chunk_bucket(longest)) in chunks, (sequences, longest)
    assert shapes.fits(1, chunk)  # one sequence always takes a whole budget: no prompt waits forever
    for pages in range(1, pages_per_seq + 1):
        assert table_width(pages, page_size, pages_per_seq) in widths
    samples = set(shapes.samples())
    for u, _ in chunks:
        for rows in range(1, max_rows + 1):
            if shapes.rows(rows) >= u:
                assert (u, shapes.rows(rows)) in samples
    most = (max_rows - 1) * (pages_for(chunk, page_size) + 1)
    assert all(batch_bucket(n) in shapes.copies() for n in range(1, most + 1))  # `prefill_paged`'s copy count


def test_the_defaults_are_84_programs():
    """The count the README and /metrics' warm_up_compilations give for the serve defaults."""
    shapes = PrefillShapes(4, 16, 512, 64, 64)
    decode = 3 * len(block_buckets(16, 64, 64))  # plain, adjusted, rich per block-list length
    prefill = len(shapes.chunks()) * len(shapes.widths())
    logprobs = len({b for _, b in shapes.samples()})
    assert (decode, prefill, len(shapes.samples()), logprobs, len(shapes.copies())) == (21, 36, 12, 5, 9)
    # a call of several sequences holds at most the budget's bucket of token slots
    assert shapes.fits(4, 128) and not shapes.fits(4, 129) and shapes.fits(2, 256) and not shapes.fits(2, 257)
