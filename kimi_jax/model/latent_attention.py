"""Absorbed MLA attention over one segment of cached keys, as partial softmax statistics.

The absorbed form (attention.py) scores a query against the latent cache directly:

    score[s] = scale · (q_lat · c_kv[s] + q_rope · k_r[s]),    o_lat = Σ_s softmax(score)[s] · c_kv[s]

A decode step attends to two segments of keys (the cache as it was, and this call's own keys), so
each segment yields a `Partial`: its running maximum m, Σ exp(score − m) and Σ exp(score − m) · c_kv.
`combine` merges the partials of all segments into the softmax-weighted latent (the usual
flash-decoding merge), so a segment can be computed by any kernel, block by block.

`attend` here is the plain reference, correct everywhere and what every fast path is tested
against; it reads the latent twice (once to score, once to weight). The TPU kernel
(`kimi_jax.kernels.latent_attention`) computes the same in one pass over the cache.

`attend_blocks` is the ragged form a paged cache's decode uses (model/paged.py): the keys come as a
flat list of blocks, each a run of one row's pages, so a batch reads what its rows hold and not
batch × the longest row. Each block yields a `Partial` of its row's queries, and the partials of a
row's blocks are merged into the row's by the same rescaling `combine` does.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so a fully masked row (a padded query) stays NaN-free


class BlockKeys(NamedTuple):
    """Keys as a flat list of blocks, each of one batch row: block w holds `latent[w]`, `k_rope[w]`
    [S_block, width] of row rows[w] (rows[w] ≥ the batch: a padding block, ignored)."""

    latent: jax.Array  # [W, S_block, kv_lora_rank]
    k_rope: jax.Array  # [W, S_block, qk_rope_head_dim]
    rows: jax.Array  # [W] int32


class Partial(NamedTuple):
    """Softmax statistics of queries [B, T, H] over one segment of keys."""

    acc: jax.Array  # [B, T, H, kv_lora] f32: Σ_s exp(score − top) · c_kv[s]
    top: jax.Array  # [B, T, H] f32: the maximum score (NEG_INF where every key is masked)
    total: jax.Array  # [B, T, H] f32: Σ_s exp(score − top)


def layer_of(a: jax.Array, layer: jax.Array | None) -> jax.Array:
    """Row `layer` of a stacked cache leaf [L, B, S, w] (the leaf itself, [B, S, w], when None)."""
    return a if layer is None else a[layer]


def attend(q_lat: jax.Array, q_rope: jax.Array, latent: jax.Array, k_rope: jax.Array, mask: jax.Array,
           layer: jax.Array | None = None, *, scale: float) -> Partial:
    """Reference: q_lat [B, T, H, C], q_rope [B, T, H, R] against latent [(L,) B, S, C] and k_rope
    [(L,) B, S, R] (layer `layer` of a stack), keys visible where mask [B, T, S] -> `Partial`."""
    latent, k_rope = (layer_of(a, layer).astype(q_lat.dtype) for a in (latent, k_rope))
    scores = (jnp.einsum("bthc,bsc->bths", q_lat, latent, preferred_element_type=jnp.float32)
              + jnp.einsum("bthr,bsr->bths", q_rope, k_rope, preferred_element_type=jnp.float32)) * scale
    scores = jnp.where(mask[:, :, None], scores, NEG_INF)
    top = scores.max(-1)
    weights = jnp.exp(scores - top[..., None])  # (B, T, H, S), in (0, 1]
    acc = jnp.einsum("bths,bsc->bthc", weights.astype(latent.dtype), latent, preferred_element_type=jnp.float32)
    return Partial(acc, top, weights.sum(-1))


def attend_blocks(q_lat: jax.Array, q_rope: jax.Array, keys: BlockKeys, mask: jax.Array, *, scale: float
                  ) -> Partial:
    """q_lat [B, T, H, C], q_rope [B, T, H, R] against the blocks of `keys`, block w's keys visible to
    its row's queries where mask [W, T, S_block] -> the `Partial` of each row [B, T, H] over all of its
    blocks. A row with no block (a slot not decoding) gets no keys: acc 0, total 1."""
    b = q_lat.shape[0]
    row = jnp.minimum(keys.rows, b - 1)  # a padding block reads row b − 1's queries; its result is dropped
    part = attend(q_lat[row], q_rope[row], keys.latent, keys.k_rope, mask, scale=scale)  # (W, T, H, …)
    # Segment ids ≥ b (padding) are out of range, so the segment reductions drop them.
    top = jnp.maximum(jax.ops.segment_max(part.top, keys.rows, b), NEG_INF)  # (B, T, H); −inf where no block
    rescale = jnp.exp(part.top - top[row])  # ≤ 1: each block relative to its row's maximum
    acc = jax.ops.segment_sum(part.acc * rescale[..., None], keys.rows, b)
    total = jax.ops.segment_sum(part.total * rescale, keys.rows, b)
    return Partial(acc, top, jnp.where(total > 0, total, 1.0))


def combine(parts: list[Partial]) -> jax.Array:
    """The softmax over the keys of all segments: Σ_s p[s] · c_kv[s], f32 [B, T, H, C]."""
    top = functools.reduce(jnp.maximum, [p.top for p in parts])
    rescale = [jnp.exp(p.top - top) for p in parts]  # 0 for a segment whose keys are all masked
    acc = sum(p.acc * r[..., None] for p, r in zip(parts, rescale))
    total = sum(p.total * r for p, r in zip(parts, rescale))
    return acc / total[..., None]
