"""The paged latent cache: a pool of fixed-size pages read and written through per-sequence page tables.

    pool    latent [(L,) P, page, kv_lora_rank], k_rope [(L,) P, page, qk_rope_head_dim]
    table   [B, n] int32: row b's i-th page holds its positions i·page .. (i+1)·page − 1 (−1: none yet)
    blocks  (decode, optional) the rows' pages again as a flat list of key blocks (`Blocks`)

A sequence then holds only the pages it has filled instead of a whole max-context row, and rows may
share pages (a cached prompt prefix). Writes go through the table; a write to a position whose page
is −1 is dropped, so a stale or padded row can never touch another sequence's page.

Reads take one of two forms:
  * through the table (`PagedCache.layer`): each row's pages gathered into a contiguous
    [B, n·page, width] view whose slot s is position s, exactly like `LatentCache`. Prefill chunks
    read this way (one row, its table cut to the chunk's end).
  * through `blocks` (decode): block w is a run of `k` pages of one row, starting at position
    starts[w]; attention scores each block against its row's queries and merges the blocks of a row
    (model/latent_attention.py `attend_blocks`). A batch then reads the pages its rows hold,
    rounded up to whole blocks, instead of every row as far as the longest: with pages of 64, 8 rows
    of 400 tokens and one of 4,000 read 32 blocks (8,192 positions), where the table made all 16
    slots read 4,096 each (65,536).

Both gathers are XLA's; a kernel that reads the pages in place (as vLLM's and tpu-inference's ragged
paged attention do) is not built. Which page a sequence gets, and the blocks of a decode call, are
decided on the host (runtime/pages.py, runtime/scheduler.py); this module only follows them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kimi_jax.config import Config
from kimi_jax.model.attention import LatentCache, decode_mask
from kimi_jax.model.latent_attention import BlockKeys
from kimi_jax.model.weights import LAYER_GROUPS

POOL_AXES = ("layers", "batch", None, None)  # [L, P, page, width]: pages split over the devices like the batch
TABLE_AXES = ("batch", None)  # [B, n]
BLOCK_AXES = (None,)  # the block list is not split: a block's row may live on any batch shard


class Blocks(NamedTuple):
    """A decode call's keys as a flat list of W blocks of k pages each (padding: row ≥ B, pages −1)."""

    rows: jax.Array  # [W] int32: the batch row the block belongs to
    pages: jax.Array  # [W, k] int32: its page ids in order (−1: none; the rest of the row's last block)
    starts: jax.Array  # [W] int32: the position of its first slot


class PagedCache(NamedTuple):
    """A layer group's page pool and the batch's page tables (shapes in the module docstring)."""

    latent: jax.Array
    k_rope: jax.Array
    table: jax.Array | None
    blocks: Blocks | None = None

    @property
    def page_size(self) -> int:
        return self.latent.shape[-2]

    def layer(self, layer: jax.Array | None) -> LatentCache:
        """Layer `layer`'s cache seen contiguously: [B, n·page, width] per leaf, slot s = position s.
        Slots on a −1 page read page 0 (any finite page; the causal mask hides them)."""
        pages = jnp.maximum(self.table, 0)  # (B, n)
        b, n = pages.shape

        def view(pool):
            # One gather of (layer, page) pairs: slicing the layer out first could copy its whole pool.
            rows = pool[pages] if layer is None else pool[layer, pages]  # (B, n, page, w)
            return rows.reshape(b, n * rows.shape[2], rows.shape[3])  # (B, n·page, w)

        return LatentCache(view(self.latent), view(self.k_rope))

    def decode_keys(self, positions: jax.Array, layer: jax.Array | None, hide_written: bool = False):
        """What decode attention reads for layer `layer`, as (keys, mask, None): with `blocks`, the blocks'
        pages (`BlockKeys`, mask [W, T, k·page]); without, each row's pages gathered through the table
        (mask [B, T, n·page]). `hide_written` masks the slots at `positions` [B, T] too (see
        `attention.decode_mask`)."""
        if self.blocks is None:
            keys = self.layer(layer)
            s = keys.latent.shape[-2]
            slots = jnp.broadcast_to(jnp.arange(s), (positions.shape[0], s))
            return keys, decode_mask(positions, slots, hide_written), None
        rows, pages, starts = self.blocks
        w, k = pages.shape
        page_size = self.page_size

        def view(pool):  # a −1 page reads page 0 (masked)
            got = pool[jnp.maximum(pages, 0)] if layer is None else pool[layer, jnp.maximum(pages, 0)]
            return got.reshape(w, k * page_size, got.shape[-1])  # (W, k·page, width)

        q_pos = positions[jnp.minimum(rows, positions.shape[0] - 1)]  # (W, T)
        k_pos = starts[:, None] + jnp.arange(k * page_size)  # (W, k·page)
        on_page = jnp.repeat(pages >= 0, page_size, axis=1)  # a −1 page holds nothing
        mask = decode_mask(q_pos, jnp.where(on_page, k_pos, -1), hide_written)
        return BlockKeys(view(self.latent), view(self.k_rope), rows), mask, None

    def write(self, latent: jax.Array, k_rope: jax.Array, positions: jax.Array,
              layer: jax.Array | None = None) -> PagedCache:
        """Store new tokens latent [B, T, kv_lora], k_rope [B, T, rope] at `positions` [B, T] through the
        table; positions < 0, past the table, or on a −1 page are dropped."""
        page_size, num_pages = self.page_size, self.latent.shape[-3]
        n = self.table.shape[1]
        block = positions // page_size  # (B, T): which table entry
        page = jnp.take_along_axis(self.table, jnp.clip(block, 0, n - 1), axis=1)
        keep = (positions >= 0) & (block < n) & (page >= 0)
        page = jnp.where(keep, page, num_pages)  # num_pages is out of range: dropped
        offset = jnp.where(keep, positions % page_size, 0)
        index = (page, offset) if layer is None else (layer, page, offset)
        return self._replace(latent=self.latent.at[index].set(latent.astype(self.latent.dtype), mode="drop"),
                             k_rope=self.k_rope.at[index].set(k_rope.astype(self.k_rope.dtype), mode="drop"))


def init_pages(cfg: Config, num_pages: int, page_size: int, dtype=jnp.bfloat16) -> dict[str, PagedCache]:
    """An empty pool per layer group ([layers, P, page, width] leaves) with no table yet (`with_table`)."""
    pool = {}
    for group, (_, count, _) in LAYER_GROUPS.items():
        n = count(cfg)
        if n:
            pool[group] = PagedCache(jnp.zeros((n, num_pages, page_size, cfg.kv_lora_rank), dtype),
                                     jnp.zeros((n, num_pages, page_size, cfg.qk_rope_head_dim), dtype),
                                     None)
    return pool


def with_table(pool: dict[str, PagedCache], table: jax.Array | None, blocks: Blocks | None = None
               ) -> dict[str, PagedCache]:
    """The pool with every group writing through `table` [B, n] and reading through it, or through
    `blocks` when given (the same pages in every layer); None drops both (the pool at rest, of one
    shape whatever the last call's)."""
    return {group: cache._replace(table=table, blocks=blocks) for group, cache in pool.items()}


def pool_axes(pool: dict[str, PagedCache]) -> dict[str, PagedCache]:
    """The logical axes of each leaf of `pool` (for the layout's shardings)."""
    return {group: PagedCache(POOL_AXES, POOL_AXES, None if c.table is None else TABLE_AXES,
                              None if c.blocks is None else Blocks(BLOCK_AXES, BLOCK_AXES + (None,), BLOCK_AXES))
            for group, c in pool.items()}
