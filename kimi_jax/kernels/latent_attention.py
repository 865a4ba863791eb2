"""One-pass absorbed MLA decode attention on TPU: flash-decoding over blocks of the latent cache.

The reference (`kimi_jax.model.latent_attention.attend`) is three XLA products: scores against the
latent, a softmax, and the weights times the latent. The TPU compiler does not fuse them, so the
latent cache — the bulk of what a decode step at a large batch must read — is read twice from HBM
(Kimi-K2, v5p-64, batch 64: 537 MB a layer each time). This Pallas kernel walks it once:

    grid (b, s): for sequence b, cache block s of BLOCK keys, in VMEM
        scores = scale · q_lat[b] · latent[b, s]ᵀ + bias[b, s]                      [H, BLOCK] per query
        online softmax: top ← max(top, max scores); rescale total and acc by exp(top_old − top)
        acc += exp(scores − top) · latent[b, s]                                     [H, C] per query

and returns the same `Partial` as the reference (attention.py merges it with the new keys' segment).
The output blocks' index does not depend on s, so they stay in VMEM across the s axis and are the
accumulators; every query and cache block is fetched once. `bias` is the rotary score with the mask
folded in, one XLA product (`rope_bias`, why in its docstring): f32 [B, T, H, S], written once and
read once (67 MB a layer at batch 64, against the 537 MB latent).

The latent arrives stacked [L, B, S, C] with the layer index as a scalar-prefetch argument that the
cache BlockSpec's index map reads, so no [B, S, C] slice of the stack is copied out first. A paged
cache would add its page table the same way: the index map would look (b, s) up in it.

Cost analysis: XLA cannot see inside a Mosaic kernel; the TPU compiler's cost analysis reports for
the custom call exactly the `CostEstimate` it is given (checked: a 1000-byte estimate is reported as
1000 bytes). So the bytes here are ours, derived from the BlockSpecs: every block of one layer's
latent once, the bias, queries and results once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kimi_jax.model import latent_attention as reference
from kimi_jax.model.latent_attention import NEG_INF, Partial

BLOCKS = (1024, 512, 256, 128)  # keys per grid step, largest first: a 1024×512 bf16 block is 1 MiB of VMEM
MIN_KEYS = 128  # shorter segments (this call's own keys) are too small to be worth a kernel launch


def block_size(keys: int) -> int | None:
    """The largest of BLOCKS that divides `keys` (None: no kernel-friendly tiling)."""
    return next((b for b in BLOCKS if keys % b == 0), None)


def _kernel(layer_ref, bias_ref, q_ref, lat_ref, acc_ref, top_ref, total_ref, *, scale):
    """One (sequence, cache block) step; refs are blocks: bias [1, T, H, BLOCK], q [1, T, H, C],
    lat [1, BLOCK, C]; acc [1, T, H, C], top/total [1, T, H, 1]."""
    del layer_ref  # read by the index maps only

    @pl.when(pl.program_id(1) == 0)
    def _start():
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)
        top_ref[...] = jnp.full(top_ref.shape, NEG_INF, top_ref.dtype)
        total_ref[...] = jnp.zeros(total_ref.shape, total_ref.dtype)

    lat = lat_ref[0].astype(q_ref.dtype)  # [BLOCK, C]
    for t in range(q_ref.shape[1]):  # T is static and small (1 at decode)
        scores = jax.lax.dot_general(q_ref[0, t], lat, (((1,), (1,)), ((), ())),  # [H, C]·[BLOCK, C]ᵀ
                                     preferred_element_type=jnp.float32) * scale + bias_ref[0, t]  # [H, BLOCK]
        old = top_ref[0, t]  # [H, 1]
        top = jnp.maximum(old, scores.max(-1, keepdims=True))
        weights = jnp.exp(scores - top)  # [H, BLOCK]
        rescale = jnp.exp(old - top)
        total_ref[0, t] = rescale * total_ref[0, t] + weights.sum(-1, keepdims=True)
        acc_ref[0, t] = rescale * acc_ref[0, t] + jnp.dot(weights.astype(lat.dtype), lat,
                                                          preferred_element_type=jnp.float32)
        top_ref[0, t] = top


def _cost(q_lat, latent, bias, keys: int) -> pl.CostEstimate:
    """Bytes and flops by the BlockSpecs: one layer's latent rows, the queries, bias and results once."""
    b, t, h, c = q_lat.shape
    io = q_lat.nbytes + bias.nbytes + b * t * h * (c + 2) * 4
    return pl.CostEstimate(flops=4 * b * t * h * keys * c, transcendentals=b * t * h * keys,
                           bytes_accessed=b * keys * c * latent.dtype.itemsize + io)


def rope_bias(q_rope: jax.Array, k_rope: jax.Array, mask: jax.Array, layer: jax.Array | None, scale: float):
    """scale · q_rope·k_ropeᵀ, NEG_INF where masked: f32 [B, T, H, S], the kernel's additive score term.

    The rotary part stays in XLA: the TPU compiler lays a [.., S, 64] cache out with S minor, and a
    Pallas operand must be row-major, so handing k_rope to the kernel copies the whole stack.
    """
    k_rope = reference.layer_of(k_rope, layer).astype(q_rope.dtype)
    s = jnp.einsum("bthr,bsr->bths", q_rope, k_rope, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask[:, :, None], s, NEG_INF)


def attend(q_lat: jax.Array, q_rope: jax.Array, latent: jax.Array, k_rope: jax.Array, mask: jax.Array,
           layer: jax.Array | None = None, *, scale: float, interpret: bool = False) -> Partial:
    """`kimi_jax.model.latent_attention.attend` in one pass over the latent cache (module docstring).

    Segments shorter than MIN_KEYS, or whose length no block in BLOCKS divides, go to the reference.
    `interpret` runs the kernel in Pallas' interpreter (CPU tests).
    """
    keys = latent.shape[-2]
    block = block_size(keys)
    if keys < MIN_KEYS or block is None:
        return reference.attend(q_lat, q_rope, latent, k_rope, mask, layer, scale=scale)
    bias = rope_bias(q_rope, k_rope, mask, layer, scale)
    if layer is None:  # one layer's cache: a stack of one
        latent, layer = latent[None], jnp.zeros((), jnp.int32)
    b, t, h, c = q_lat.shape
    per_seq = lambda *shape: pl.BlockSpec((1, *shape), lambda i, j, lyr: (i,) + (0,) * len(shape))
    grid = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(b, keys // block),
        in_specs=[pl.BlockSpec((1, t, h, block), lambda i, j, lyr: (i, 0, 0, j)), per_seq(t, h, c),
                  pl.BlockSpec((None, 1, block, c), lambda i, j, lyr: (lyr[0], i, j, 0))],
        out_specs=[per_seq(t, h, c), per_seq(t, h, 1), per_seq(t, h, 1)])
    acc, top, total = pl.pallas_call(
        functools.partial(_kernel, scale=scale), grid_spec=grid,
        out_shape=[jax.ShapeDtypeStruct((b, t, h, c), jnp.float32)]
        + [jax.ShapeDtypeStruct((b, t, h, 1), jnp.float32)] * 2,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=_cost(q_lat, latent, bias, keys), interpret=interpret, name="latent_attention",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), bias, q_lat, latent)
    return Partial(acc, top[..., 0], total[..., 0])
