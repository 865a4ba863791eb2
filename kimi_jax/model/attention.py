"""Multi-head latent attention (MLA), DeepSeek-V2/V3 section 2.1.

    c_q   = RMSNorm(x W_qa)                         q = c_q W_qb  -> per head [q_nope | q_rope]
    [c_kv | k_r] = x W_kva                           c_kv = RMSNorm(c_kv)   (the cached latent)
    [k_nope | v] = c_kv W_kvb  (per head)            k_r shared by all heads, roped once
    o = softmax(scale · (q_nope·k_nope + q_rope·k_r)) v,   out = o W_o

Per layer and token the cache holds only c_kv (kv_lora_rank) and roped k_r (qk_rope_head_dim).
Two equivalent ways to attend to it:
  * expanded: build k_nope and v for every cached token (cheap per query when queries are many);
  * absorbed: fold W_kvb's key part into the query (q_nope W_uk -> latent space) and apply its value
    part after attention, so per-head K/V are never built (decode: one query, many keys). Each
    segment of keys (the cache, this call's keys) yields partial softmax statistics from the
    backend's `latent_attention` (reference in latent_attention.py), merged by `combine`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kimi_jax.config import Config
from kimi_jax.model.backend import REFERENCE, Backend
from kimi_jax.model.latent_attention import NEG_INF, BlockKeys, Partial, attend_blocks, combine
from kimi_jax.model.layers import apply_rope, rms_norm, rope_angles, softmax_scale
from kimi_jax.model.layout import UNSHARDED, Layout
from kimi_jax.model.quant import FP8_KIND, QArray, dequantize, fp8_values
from kimi_jax.model.weights import attention_specs, declare


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

    def decode_keys(self, positions: jax.Array, layer: jax.Array | None, hide_written: bool = False):
        """What decode attention reads for layer `layer`, as (keys, mask, layer): the stack itself with the
        layer index (the backend's latent attention reads that row in place), or one layer's cache and
        None; mask [B, T, S] by `decode_mask`."""
        s = self.latent.shape[-2]
        slots = jnp.broadcast_to(jnp.arange(s), (positions.shape[0], s))
        return self, decode_mask(positions, slots, hide_written), layer

    def write(self, latent: jax.Array, k_rope: jax.Array, positions: jax.Array,
              layer: jax.Array | None = None) -> LatentCache:
        """`write_cache` as a method, so MLA writes a LatentCache and a paged cache (model/paged.py) alike."""
        return write_cache(self, latent, k_rope, positions, layer)


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


def decode_mask(q_pos: jax.Array, k_pos: jax.Array, hide_written: bool) -> jax.Array:
    """`attention_mask` of queries q_pos [N, T] over the cached keys at k_pos [N, S]; with `hide_written`
    also hiding the slots the queries' own positions occupy (decode that reads the cache as it was
    before this call's write, and scores the new keys apart)."""
    mask = attention_mask(q_pos, k_pos)
    if hide_written:
        mask &= ~(q_pos[:, :, None] == k_pos[:, None, :]).any(1)[:, None, :]
    return mask


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

        `cache` is one layer's, or with `layer` a layer group's stack of which row `layer` is used; a
        LatentCache or a paged cache (model/paged.py), which reads and writes through its page table.
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
            segments = [(LatentCache(latent, k_rope), attention_mask(positions, positions), None)]
        elif self.absorb and self.backend.decode_writes_first:
            # Decode: write this call's keys, then attend to the cache (one segment). Reading the old
            # cache instead makes XLA CPU copy the layer group's whole cache stack (or page pool) every
            # layer of every step, to keep the old rows for the read (3.2 s against 0.76 s for 64 tokens
            # of the embedded model over the 1,024-page pool `serve` allocates by default).
            cache = cache.write(latent, k_rope, positions, layer)
            segments = [cache.decode_keys(positions, layer)]
        elif self.absorb:
            # Decode on TPU: attend to the cache as it was before this call (a stacked cache's layer
            # `layer` read in place, a paged one through its table or blocks) and to this call's keys
            # apart, so that the step only writes the cache (the TPU compiler re-reads a row just written:
            # 14 MB a layer for Kimi-K2 at batch 1). The new keys are rounded to the cache's dtype, as stored.
            segments = [cache.decode_keys(positions, layer, hide_written=True)]
            dtypes = cache.latent.dtype, cache.k_rope.dtype
            new = LatentCache(latent.astype(dtypes[0]).astype(x.dtype), k_rope.astype(dtypes[1]).astype(x.dtype))
            segments.append((new, attention_mask(positions, positions), None))
            cache = cache.write(latent, k_rope, positions, layer)
        else:  # prefill: write, then attend to the cache (one segment: no key is scored twice)
            cache = cache.write(latent, k_rope, positions, layer)
            mine = cache.layer(layer)
            k_pos = jnp.broadcast_to(jnp.arange(mine.latent.shape[-2]), (b, mine.latent.shape[-2]))
            segments = [(LatentCache(*(c.astype(x.dtype) for c in mine)), attention_mask(positions, k_pos), None)]

        heads = HeadWeights(p["kv_b_proj"], cfg, self.layout)
        if self.absorb:
            q_lat = heads.to_latent(q_nope)  # (B, T, H, kv_lora): q_nope·k_nope = (q_nope W_uk)·c_kv
            o_lat = combine([self._attend(q_lat, q_rope, *segment) for segment in segments])  # (B, T, H, kv_lora)
            o = heads.from_latent(o_lat.astype(x.dtype))  # (B, T, H, v): o = (p·c_kv) W_uvᵀ
        else:
            o = _expanded(q_nope, q_rope, *segments[0][:2], *heads.dequantized(x.dtype), softmax_scale(cfg))
        o = self.layout.constrain(o, ("batch", "seq", "heads", None))  # o_proj then sums over heads
        out = self.backend.linear(o.reshape(b, t, h * vd), p["o_proj"])
        return out, cache

    def _attend(self, q_lat, q_rope, keys: LatentCache, mask, layer) -> Partial:
        """The backend's latent attention over one segment (layer `layer` of a stacked cache, or one
        layer's keys when None), run on each device's heads and sequences; a paged cache's blocks
        (`BlockKeys`) by the reference `attend_blocks`, partitioned by XLA."""
        if isinstance(keys, BlockKeys):
            return attend_blocks(q_lat, q_rope, keys, mask, scale=softmax_scale(self.cfg))
        q_axes, cache_axes = ("batch", "seq", "heads", None), ("batch", "cache_seq", None)
        args, axes = [q_lat, q_rope, keys.latent, keys.k_rope, mask], [q_axes, q_axes, cache_axes, cache_axes,
                                                                       ("batch", "seq", "cache_seq")]
        if layer is not None:
            axes[2:4] = [("layers", *cache_axes)] * 2
            args, axes = args + [layer], axes + [()]
        attend = functools.partial(self.backend.latent_attention, scale=softmax_scale(self.cfg))
        return self.layout.local(attend, axes, [q_axes, q_axes[:3], q_axes[:3]])(*args)


def _expanded(q_nope, q_rope, keys: LatentCache, mask, w_uk, w_uv, scale):
    """Build per-head k_nope and v for every key, then ordinary attention.

    Written as XLA CPU computes it well: the keys' expansion is one plain product of the latent with
    W_uk and W_uv side by side (as `einsum("bsc,hnc->bshn")` it took 8× as long), each head's query
    meets one key of [k_nope | k_rope] (one product, not two summed), heads lead the scores, and the
    softmax's normalisation divides the [B, H, T, v] result, not the [B, H, T, S] weights. A 256-token
    prefill chunk after 3,584 cached positions of the embedded model (3 layers, CPU): 85 ms against
    226 ms written plainly (BENCHMARKS.md "Paged cache").
    """
    b, s, c = keys.latent.shape
    h, nope = w_uk.shape[:2]
    w = jnp.concatenate([w_uk, w_uv], axis=1).reshape(-1, c)  # (H·(nope + v), C)
    kv = jnp.einsum("bsc,jc->bsj", keys.latent.astype(w.dtype), w).reshape(b, s, h, -1).transpose(0, 2, 1, 3)
    k_rope = jnp.broadcast_to(keys.k_rope[:, None].astype(kv.dtype), (b, h, s, keys.k_rope.shape[-1]))
    k = jnp.concatenate([kv[..., :nope], k_rope], axis=-1)  # (B, H, S, nope + rope)
    q = jnp.concatenate([q_nope, q_rope.astype(q_nope.dtype)], axis=-1).transpose(0, 2, 1, 3)  # (B, H, T, ·)
    scores = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None], scores, NEG_INF)
    weights = jnp.exp(scores - scores.max(-1, keepdims=True))  # (B, H, T, S), in (0, 1]
    o = jnp.einsum("bhts,bhsv->bhtv", weights.astype(kv.dtype), kv[..., nope:], preferred_element_type=jnp.float32)
    return (o / weights.sum(-1, keepdims=True)).astype(kv.dtype).transpose(0, 2, 1, 3)  # (B, T, H, v)


class HeadWeights(NamedTuple):
    """kv_b_proj [H·(nope + v), kv_lora] seen per head: W_uk [H, nope, kv_lora] and W_uv [H, v, kv_lora].

    The absorbed products read it without building a dequantized copy when it is block-fp8 and its
    blocks tile the heads (nope, v and kv_lora multiples of the block, as in every DeepSeek-V3-style
    release: 128, 128, 512 with 128×128 blocks). Each head's nope rows then span whole row blocks
    and the scales act per (head, row block, column block): on the output of the key product (its
    columns are kv_lora), on the input of the value product. The converted fp8 values feed batched
    dots that fuse the convert; dequantizing first writes a bf16 copy and a float32 broadcast of the
    scales (17× the weight's fp8 bytes per step for Kimi-K2, by the TPU compiler). Other weights
    (plain, INT4, blocks that straddle heads) are dequantized.
    """

    w: QArray | jax.Array
    cfg: Config
    layout: Layout

    def _tiled(self) -> tuple[jax.Array, jax.Array, int] | None:
        """(values [H, R, bo, kv_lora] as stored, scales [H, R, kv_lora / bc], bo) when the blocks tile
        the heads (R = (nope + v) / bo row blocks per head); None otherwise."""
        cfg, w = self.cfg, self.w
        if not isinstance(w, QArray) or w.kind != FP8_KIND:
            return None
        (bo, bc), nope, vd, lat = w.block, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        if nope % bo or vd % bo or lat % bc:
            return None
        h, r = cfg.num_attention_heads, (nope + vd) // bo
        values = self.layout.constrain(w.values.reshape(h, r, bo, lat), ("heads", None, None, None))
        scales = self.layout.constrain(w.scales.reshape(h, r, lat // bc), ("heads", None, None))
        return values, scales, bo

    def dequantized(self, dtype) -> tuple[jax.Array, jax.Array]:
        """(W_uk [H, nope, kv_lora], W_uv [H, v, kv_lora]) in `dtype` (the expanded form's, and the fallback)."""
        cfg = self.cfg
        nope = cfg.qk_nope_head_dim
        w = dequantize(self.w, dtype).reshape(cfg.num_attention_heads, nope + cfg.v_head_dim, cfg.kv_lora_rank)
        w = self.layout.constrain(w, ("heads", None, None))
        return w[:, :nope], w[:, nope:]

    def to_latent(self, q_nope: jax.Array) -> jax.Array:
        """q_nope [B, T, H, nope] -> q_nope W_uk [B, T, H, kv_lora] (in q_nope's dtype)."""
        tiled, dtype = self._tiled(), q_nope.dtype
        if tiled is None:
            return jnp.einsum("bthn,hnc->bthc", q_nope, self.dequantized(dtype)[0])
        values, scales, bo = tiled
        b, t, h, nope = q_nope.shape
        k, nb = nope // bo, scales.shape[-1]
        y = jnp.einsum("bthki,hkic->bthkc", q_nope.reshape(b, t, h, k, bo), fp8_values(values[:, :k], dtype),
                       preferred_element_type=jnp.float32)  # per row block of W_uk, unscaled
        y = y.reshape(b, t, h, k, nb, -1) * scales[:, :k, :, None]  # each column block by its scale
        return y.sum(3).reshape(b, t, h, -1).astype(dtype)

    def from_latent(self, o_lat: jax.Array) -> jax.Array:
        """o_lat [B, T, H, kv_lora] -> o_lat W_uvᵀ [B, T, H, v] (in o_lat's dtype)."""
        tiled, dtype = self._tiled(), o_lat.dtype
        if tiled is None:
            return jnp.einsum("bthc,hvc->bthv", o_lat, self.dequantized(dtype)[1])
        values, scales, bo = tiled
        b, t, h, lat = o_lat.shape
        k = self.cfg.qk_nope_head_dim // bo  # W_uv's row blocks follow W_uk's
        s = scales[:, k:]  # [H, v / bo, nb]
        xs = o_lat.reshape(b, t, h, 1, s.shape[-1], -1) * s[:, :, :, None].astype(dtype)  # scales on the input
        y = jnp.einsum("bthkc,hkic->bthki", xs.reshape(b, t, h, s.shape[1], lat), fp8_values(values[:, k:], dtype),
                       preferred_element_type=jnp.float32)
        return y.reshape(b, t, h, -1).astype(dtype)

