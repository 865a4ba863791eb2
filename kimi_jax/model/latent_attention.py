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
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so a fully masked row (a padded query) stays NaN-free


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


def combine(parts: list[Partial]) -> jax.Array:
    """The softmax over the keys of all segments: Σ_s p[s] · c_kv[s], f32 [B, T, H, C]."""
    top = functools.reduce(jnp.maximum, [p.top for p in parts])
    rescale = [jnp.exp(p.top - top) for p in parts]  # 0 for a segment whose keys are all masked
    acc = sum(p.acc * r[..., None] for p, r in zip(parts, rescale))
    total = sum(p.total * r for p, r in zip(parts, rescale))
    return acc / total[..., None]
