"""Multi-head latent attention (MLA), DeepSeek-V2/V3 section 2.1.

    c_q   = RMSNorm(x W_qa)                         q = c_q W_qb  -> per head [q_nope | q_rope]
    [c_kv | k_r] = x W_kva                           c_kv = RMSNorm(c_kv)   (the cached latent)
    [k_nope | v] = c_kv W_kvb  (per head)            k_r shared by all heads, roped once
    o = softmax(scale · (q_nope·k_nope + q_rope·k_r)) v,   out = o W_o

Per layer and token the cache holds only c_kv (kv_lora_rank) and roped k_r (qk_rope_head_dim).
Two equivalent ways to attend to it:
  * expanded: build k_nope and v for every cached token (cheap per query when queries are many);
  * absorbed: fold W_kvb's key part into the query (q_nope W_uk -> latent space) and apply its value
    part after attention, so per-head K/V are never built (decode: one query, many keys).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kimi_jax.config import Config
from kimi_jax.model.backend import REFERENCE, Backend
from kimi_jax.model.layers import apply_rope, rms_norm, rope_angles, softmax_scale
from kimi_jax.model.layout import UNSHARDED, Layout
from kimi_jax.model.quant import dequantize
from kimi_jax.model.weights import attention_specs, declare

NEG_INF = -1e30  # finite, so a fully masked row (a padded query) stays NaN-free


class LatentCache(NamedTuple):
    """The latent cache: slot s holds the token at position s of each sequence.

    One layer's is [B, S, width]; a layer group's is stacked [layers, B, S, width], and a layer reads
    and writes its own row of the stack in place (the stack is the layer loop's carry, so the step
    never holds a second copy of the cache).
    """

    latent: jax.Array  # [(L,) B, S, kv_lora_rank], normalised c_kv
    k_rope: jax.Array  # [(L,) B, S, qk_rope_head_dim], roped shared key

    def layer(self, layer: jax.Array | None) -> LatentCache:
        """Layer `layer`'s cache [B, S, width] (the cache itself when `layer` is None)."""
        return self if layer is None else LatentCache(self.latent[layer], self.k_rope[layer])


def write_cache(cache: LatentCache, latent: jax.Array, k_rope: jax.Array, positions: jax.Array,
                layer: jax.Array | None = None) -> LatentCache:
    """Store new tokens at slot = position (of layer `layer` of a stacked cache); positions < 0 or ≥ S
    (padding) are dropped."""
    s = cache.latent.shape[-2]
    slots = jnp.where((positions >= 0) & (positions < s), positions, s)  # s is out of range: dropped
    b = jnp.arange(positions.shape[0])[:, None]
    index = (b, slots) if layer is None else (layer, b, slots)
    return LatentCache(cache.latent.at[index].set(latent.astype(cache.latent.dtype), mode="drop"),
                       cache.k_rope.at[index].set(k_rope.astype(cache.k_rope.dtype), mode="drop"))


def attention_mask(q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """[B, T, S] causal mask: key visible if 0 ≤ k_pos ≤ q_pos (a negative position is padding)."""
    return (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0) & (q_pos[:, :, None] >= 0)


def _softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    scores = jnp.where(mask[:, None], scores, NEG_INF)  # scores [B, H, T, S]
    return jax.nn.softmax(scores, axis=-1)


class MLA(nn.Module):
    """MLA for one layer. `absorb` picks the absorbed form (decode) over the expanded one (prefill)."""

    cfg: Config
    absorb: bool = False
    backend: Backend = REFERENCE  # how the projections run (see backend.py)
    layout: Layout = UNSHARDED  # placement hooks (logical names only; see layout.py)

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, cache: LatentCache | None = None,
                 layer: jax.Array | None = None):
        """x [B, T, D], positions [B, T] (−1 = padding) -> (out [B, T, D], updated cache or None).

        `cache` is one layer's, or with `layer` a layer group's stack of which row `layer` is used.
        """
        cfg = self.cfg
        p = declare(self, attention_specs(cfg), cfg)
        b, t, _ = x.shape
        h, nope, rope, vd = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        eps = cfg.rms_norm_eps
        cos, sin = rope_angles(cfg, jnp.maximum(positions, 0))

        c_q = rms_norm(self.backend.linear(x, p["q_a_proj"]), p["q_a_norm"], eps)
        q = self.backend.linear(c_q, p["q_b_proj"]).reshape(b, t, h, nope + rope)  # (B, T, H, nope+rope)
        q = self.layout.constrain(q, ("batch", "seq", "heads", None))  # heads stay where q_b_proj's rows are
        q_nope, q_rope = q[..., :nope], apply_rope(q[..., nope:], cos, sin)

        kv = self.backend.linear(x, p["kv_a_proj"])  # (B, T, kv_lora + rope)
        latent = rms_norm(kv[..., :cfg.kv_lora_rank], p["kv_a_norm"], eps)
        k_rope = apply_rope(kv[..., cfg.kv_lora_rank:], cos, sin)

        if cache is None:
            keys, k_pos = LatentCache(latent, k_rope), positions
        else:
            cache = write_cache(cache, latent, k_rope, positions, layer)
            mine = cache.layer(layer)
            keys = LatentCache(mine.latent.astype(x.dtype), mine.k_rope.astype(x.dtype))
            k_pos = jnp.broadcast_to(jnp.arange(keys.latent.shape[1]), (b, keys.latent.shape[1]))
        mask = attention_mask(positions, k_pos)

        w_kv = dequantize(p["kv_b_proj"], x.dtype).reshape(h, nope + vd, cfg.kv_lora_rank)
        w_kv = self.layout.constrain(w_kv, ("heads", None, None))
        w_uk, w_uv = w_kv[:, :nope], w_kv[:, nope:]  # (H, nope, kv), (H, v, kv)
        attend = _absorbed if self.absorb else _expanded
        o = attend(q_nope, q_rope, keys, mask, w_uk, w_uv, softmax_scale(cfg))  # (B, T, H, v)
        o = self.layout.constrain(o, ("batch", "seq", "heads", None))  # o_proj then sums over heads
        out = self.backend.linear(o.reshape(b, t, h * vd), p["o_proj"])
        return out, cache


def _expanded(q_nope, q_rope, keys: LatentCache, mask, w_uk, w_uv, scale):
    """Build per-head k_nope and v for every key, then ordinary attention."""
    k_nope = jnp.einsum("bsc,hnc->bshn", keys.latent, w_uk)
    v = jnp.einsum("bsc,hvc->bshv", keys.latent, w_uv)
    scores = (jnp.einsum("bthn,bshn->bhts", q_nope, k_nope, preferred_element_type=jnp.float32)
              + jnp.einsum("bthr,bsr->bhts", q_rope, keys.k_rope, preferred_element_type=jnp.float32))
    probs = _softmax(scores * scale, mask).astype(v.dtype)
    return jnp.einsum("bhts,bshv->bthv", probs, v)


def _absorbed(q_nope, q_rope, keys: LatentCache, mask, w_uk, w_uv, scale):
    """Attend in the latent space: q_nope·k_nope = (q_nope W_uk)·c_kv, and o = (p·c_kv) W_uvᵀ."""
    q_lat = jnp.einsum("bthn,hnc->bthc", q_nope, w_uk)  # (B, T, H, kv_lora)
    scores = (jnp.einsum("bthc,bsc->bhts", q_lat, keys.latent, preferred_element_type=jnp.float32)
              + jnp.einsum("bthr,bsr->bhts", q_rope, keys.k_rope, preferred_element_type=jnp.float32))
    probs = _softmax(scores * scale, mask).astype(keys.latent.dtype)
    o_lat = jnp.einsum("bhts,bsc->bthc", probs, keys.latent)
    return jnp.einsum("bthc,hvc->bthv", o_lat, w_uv)
