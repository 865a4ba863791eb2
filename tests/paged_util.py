"""Paged decode against contiguous decode, shared by tests/test_paged.py (one process) and
tests/paged_two_processes.py (each of two processes on one mesh).

`paged_equals_contiguous` greedy-decodes PROMPTS through scrambled page tables and through the
contiguous cache and asserts their fp32 logits agree at prefill and every step. It reads arrays back
through `host`: `np.asarray` in one process; across processes, where no process holds a whole
array, a gather of every process's shards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.model.paged import init_pages, with_table
from kimi_jax.runtime.pages import block_list, pages_for
from kimi_jax.runtime.requests import make_requests

PROMPTS = [[5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [42, 7, 99]]
NEW = 8
PAGE = 4
TOLERANCE = 1e-5  # fp32: the largest difference relative to the largest logit


def rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def scrambled_tables(rows: int, width: int, num_pages: int) -> np.ndarray:
    """Each row's pages out of order and interleaved with the others' (page ids reversed, strided)."""
    ids = np.arange(num_pages)[::-1][:rows * width]
    return ids.reshape(width, rows).T.astype(np.int32)  # (rows, width)


def paged_equals_contiguous(m, contiguous_gen=None, paged_gen=None, host=np.asarray) -> dict[str, np.ndarray]:
    """Greedy-decode PROMPTS through page tables (by `paged_gen`, default m's generator) and through the
    contiguous cache of `contiguous_gen` (default m's); assert the fp32 logits agree at prefill and at
    every step, for decode reading through the table and through blocks of pages. -> the prompts' rows
    of each, prefill first then the NEW steps: {"contiguous", "paged", "blocks"} -> [NEW + 1, 3, V]."""
    cfg = m.config
    gen = paged_gen or m.generator
    ref = contiguous_gen or m.generator
    requests = make_requests(cfg, PROMPTS, max_new_tokens=NEW + 1, temperature=0)
    last, cache, *_ = ref.prefill(requests)
    b, width, num_pages = 4, 8, 32  # batch bucket of 3 prompts; 8 pages of 4 = 32 positions per row
    tables = scrambled_tables(len(PROMPTS), width, num_pages)
    pool = init_pages(cfg, num_pages, PAGE, m.dtype)
    if gen.mesh is not None:
        pool = jax.device_put(pool, gen.pool_shardings(pool))
    counts = jnp.zeros((b, cfg.padded_vocab_size), jnp.int32)
    paged_last, pool, counts, state, _, first = gen.prefill_paged(pool, counts, requests, [0, 1, 2], tables,
                                                                  [0, 0, 0], [[]] * 3)
    last, paged_last = host(last)[:3], host(paged_last)[:3]
    assert rel(paged_last, last) <= TOLERANCE
    assert list(host(first)[:3]) == list(last.argmax(-1))
    assert list(host(state.positions)[:3]) == [len(p) for p in PROMPTS]  # where each first token goes
    seen = {"contiguous": [last], "paged": [paged_last], "blocks": [paged_last]}
    table = np.full((b, width), -1, np.int32)
    table[:3] = tables
    positions = np.array([len(p) for p in PROMPTS] + [-1], np.int32)
    tokens = np.concatenate([last.argmax(-1), [0]]).astype(np.int32)  # the padding row's token is unread
    # Blocks of 3 pages (12 positions): row 1's 14-token prompt spans two, and its last block has −1
    # pages; the rows' pages a decode of NEW steps reaches, listed out of row order, and 3 padding blocks.
    reach = {r: list(tables[r, :pages_for(len(PROMPTS[r]) + NEW, PAGE)]) for r in (2, 0, 1)}
    blocks = block_list(reach, 3, PAGE, b, 8)
    assert (blocks.rows == b).sum() == 3 and (blocks.pages == -1).any()
    paged = with_table(pool, table)
    by_blocks = with_table(jax.tree.map(jnp.copy, pool), table, blocks)
    for step in range(NEW):
        logits, cache = ref.step_logits(ref.params, cache, tokens, positions)
        paged_logits, paged = gen.step_logits(gen.params, paged, tokens, positions)
        block_logits, by_blocks = gen.step_logits(gen.params, by_blocks, tokens, positions)
        logits, paged_logits, block_logits = (host(x)[:3] for x in (logits, paged_logits, block_logits))
        assert rel(paged_logits, logits) <= TOLERANCE, f"step {step}"
        assert rel(block_logits, logits) <= TOLERANCE, f"step {step} (blocks)"
        for name, x in (("contiguous", logits), ("paged", paged_logits), ("blocks", block_logits)):
            seen[name].append(x)
        tokens = np.concatenate([logits.argmax(-1), [0]]).astype(np.int32)
        positions = np.where(positions >= 0, positions + 1, -1).astype(np.int32)
    return {name: np.stack(xs) for name, xs in seen.items()}
