"""The paged latent cache: a pool of fixed-size pages read and written through per-sequence page tables.

    pool    latent [(L,) P, page, kv_lora_rank], k_rope [(L,) P, page, qk_rope_head_dim]
    table   [B, n] int32: row b's i-th page holds its positions i·page .. (i+1)·page − 1 (−1: none yet)

A sequence then holds only the pages it has filled instead of a whole max-context row, and rows may
share pages (a cached prompt prefix). Attention reads a row through its table as a contiguous
[B, n·page, width] view (`PagedCache.layer`) and is otherwise unchanged: the view's slot s is
position s, exactly like `LatentCache`. This gather is the plain reference; it materialises the view
per layer (a fused kernel that reads pages in place is the fast path to come). Writes to a position
whose page is −1 are dropped, so a stale or padded row can never touch another sequence's page.

Which page a sequence gets is decided on the host (runtime/pages.py); this module only follows the table.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kimi_jax.config import Config
from kimi_jax.model.attention import LatentCache
from kimi_jax.model.weights import LAYER_GROUPS

POOL_AXES = ("layers", "batch", None, None)  # [L, P, page, width]: pages split over the devices like the batch
TABLE_AXES = ("batch", None)  # [B, n]


class PagedCache(NamedTuple):
    """A layer group's page pool and the batch's page tables (shapes in the module docstring)."""

    latent: jax.Array
    k_rope: jax.Array
    table: jax.Array | None

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

    def keys(self, layer: jax.Array | None) -> tuple[LatentCache, None]:
        """What decode attention reads for layer `layer`: its rows gathered through the page table, as one
        layer's cache (a kernel that reads the pages in place is not built)."""
        return self.layer(layer), None

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


def with_table(pool: dict[str, PagedCache], table: jax.Array | None) -> dict[str, PagedCache]:
    """The pool with every group reading through `table` [B, n] (the same pages in every layer); None
    drops it (the pool at rest, of one shape whatever the last call's table)."""
    return {group: cache._replace(table=table) for group, cache in pool.items()}


def pool_axes(pool: dict[str, PagedCache]) -> dict[str, PagedCache]:
    """The logical axes of each leaf of `pool` (for the layout's shardings)."""
    return {group: PagedCache(POOL_AXES, POOL_AXES, None if c.table is None else TABLE_AXES)
            for group, c in pool.items()}
