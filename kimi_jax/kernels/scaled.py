"""Block-fp8 products that read the fp8 weight once and never build a dequantized copy (GPU, TPU).

x @ Wᵀ with W[o, i] = W_fp8[o, i] · S[o // bo, i // bi]. XLA on TPU fuses an fp8 → bf16 convert into
a plain dot (the weight is read once, as fp8), but not a multiply by the block scales: dequantizing
first writes and reads back a bf16 copy of the weight (≥ 5× its fp8 bytes, measured with the TPU
compiler). So the scales move to the activations, which are a few rows at decode:

  * rows (when the weight has fewer output blocks than input blocks): one copy of x per output block
    b, scaled column-wise by S[b, i // bi]; one plain dot of all copies with the converted weight;
    each output column keeps the copy of its own block;
  * cols (otherwise): one copy of x per input block j, zero outside block j; one plain dot; the
    partial outputs are summed, each scaled by S[o // bo, j].

Either way the weight is read once and the dot does `expansion = min(blocks out, blocks in)` times
the work (16 for Kimi-K2's experts), which is why `linear` uses it only for few rows
(`MAX_EXPANDED_ROWS`) and dequantizes otherwise. Other weights (plain, INT4) are dequantized.
Tested against `quant.linear` (tests/test_moe.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kimi_jax.model.quant import FP8_KIND, QArray, dequantize, fp8_values

# Rows × expansion up to which a dense product scales its activations (above it, dequantizing the
# weight once costs less than the extra work): 1024 rows is a few passes of a 128- or 256-wide MXU.
MAX_EXPANDED_ROWS = 1024


def expansion(w) -> int:
    """How many times the work of a plain product `scaled_matmul` does for weight `w` (0: not block-fp8)."""
    if not isinstance(w, QArray) or w.kind != FP8_KIND:
        return 0
    return min(w.scales.shape[-2:])


def _per_column(scales: jax.Array, block: int, n: int) -> jax.Array:
    """scales [..., nb] -> [..., n]: each repeated over its block of `block` columns (broadcast, reshape)."""
    nb = scales.shape[-1]
    full = jnp.broadcast_to(scales[..., None], (*scales.shape, block)).reshape(*scales.shape[:-1], nb * block)
    return full[..., :n]


def scaled_matmul(x: jax.Array, w: QArray, dtype) -> jax.Array:
    """x [M, in] @ W[out, in]ᵀ -> float32 [M, out] for a block-fp8 W, without a dequantized W."""
    out, inp = w.shape
    bo, bi = w.block
    nbo, nbi = w.scales.shape
    x = x.astype(dtype)
    values = fp8_values(w.values, dtype)
    s = w.scales.astype(jnp.float32)
    if nbo <= nbi:
        xs = x[None] * _per_column(s, bi, inp).astype(dtype)[:, None, :]  # [nbo, M, in]
        y = jnp.einsum("bmi,oi->bmo", xs, values, preferred_element_type=jnp.float32)  # [nbo, M, out]
        own = (jnp.arange(out)[None, :] // bo == jnp.arange(nbo)[:, None]).astype(jnp.float32)  # [nbo, out]
        return jnp.einsum("bmo,bo->mo", y, own)
    mask = (jnp.arange(inp)[None, :] // bi == jnp.arange(nbi)[:, None]).astype(dtype)  # [nbi, in]
    xs = x[None] * mask[:, None, :]  # [nbi, M, in]
    y = jnp.einsum("jmi,oi->jmo", xs, values, preferred_element_type=jnp.float32)  # [nbi, M, out]
    return jnp.einsum("jmo,jo->mo", y, _per_column(s.T, bo, out))  # Σ_j partial_j · S[o // bo, j]


def linear(x: jax.Array, w: QArray | jax.Array, dtype=None) -> jax.Array:
    """`quant.linear` for GPU/TPU: x[..., in] @ W[out, in]ᵀ in `dtype` (x's by default).

    A block-fp8 weight times few rows goes through `scaled_matmul` (the weight read once, as fp8);
    more rows dequantize it (block scales broadcast by reshape, never a full-size scale array).
    """
    dtype = dtype or x.dtype
    rows = math.prod(x.shape[:-1])
    e = expansion(w)
    if e and rows * e <= MAX_EXPANDED_ROWS:
        y = scaled_matmul(x.reshape(rows, x.shape[-1]), w, dtype)
        return y.astype(dtype).reshape(*x.shape[:-1], w.shape[0])
    return jnp.einsum("...i,oi->...o", x.astype(dtype), dequantize(w, dtype))


def product(x: jax.Array, w: QArray | jax.Array, dtype) -> jax.Array:
    """x [M, in] @ W[out, in]ᵀ -> float32 [M, out]: `scaled_matmul` for block-fp8, else a plain dot."""
    if expansion(w):
        return scaled_matmul(x, w, dtype)
    return jnp.einsum("mi,oi->mo", x.astype(dtype), dequantize(w, dtype), preferred_element_type=jnp.float32)


def index(w, layer: jax.Array | None, e: jax.Array):
    """Expert `e` of w [E, ...] (or of layer `layer` of a stack [L, E, ...]) by dynamic index, per leaf.

    On TPU a dynamic index into a loop-invariant stack fuses into the product that reads it (only the
    expert's bytes move); a gather (`w[ids]`) or a slice taken out of a scanned stack is copied first.
    """
    def one(a):
        if layer is not None:
            a = jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False)
        return jax.lax.dynamic_index_in_dim(a, e, 0, keepdims=False)

    return jax.tree.map(one, w)
