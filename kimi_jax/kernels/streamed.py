"""Dense products for a few rows on one CPU device: the weight converted and multiplied slice by slice.

At decode a product is a few rows times a whole weight, so reading the weight is the whole cost,
and XLA's CPU backend fuses no conversion into a dot: the plain `quant.linear` writes the whole
converted weight (fp8 -> float32, or bf16 -> float32 for its f32 dot) to memory and reads it
back, about 9 bytes moved per fp8 value where the product needs 1. `streamed_linear` keeps each
slice's conversion in cache while its dot reads it. `linear` / `logits` are the backend entry
points: they stream only in the decode regime and fall back to the plain products otherwise.
Tested against `quant.linear` (tests/test_quant.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kimi_jax.model.quant import QArray, dequantize
from kimi_jax.model.quant import linear as plain_linear
from kimi_jax.model.quant import logits as plain_logits

# Products with at most this many rows of x stream their weight: the decode regime, where reading the
# weight is the whole cost. Larger products (prefill, training) reuse each converted weight over many
# rows and run as one dot.
STREAM_MAX_ROWS = 64


def streams(x: jax.Array) -> bool:
    """Whether a product with activation `x` [..., in] is in the decode regime (few rows)."""
    return x.size // x.shape[-1] <= STREAM_MAX_ROWS


def linear(x: jax.Array, w: QArray | jax.Array) -> jax.Array:
    """`quant.linear` (x's dtype), streamed when x has few rows."""
    return streamed_linear(x, w) if streams(x) else plain_linear(x, w)


def logits(x: jax.Array, lm_head: jax.Array, dtype) -> jax.Array:
    """`quant.logits` (float32 logits, products in `dtype`), streamed when x has few rows."""
    return streamed_linear(x.astype(dtype), lm_head, jnp.float32) if streams(x) else plain_logits(x, lm_head, dtype)


STREAM_SLICE_BYTES = 2 << 20  # weight bytes per slice: the best of 0.5-8 MiB on the CPU bench config (BENCHMARKS.md)


def streamed_linear(x: jax.Array, w: QArray | jax.Array, dtype=None,
                    slice_bytes: int = STREAM_SLICE_BYTES) -> jax.Array:
    """x[..., in] @ W[out, in]ᵀ with W converted and multiplied one slice of output rows at a time.

    The arithmetic is float32 throughout (the fp8 values times their scales are exact in float32),
    rounded to `dtype` (x's by default) once at the end. Slices are whole scale blocks; a weight that
    cannot be cut so falls back to the plain product.
    """
    dtype = dtype or x.dtype
    n, k = w.shape[-2:]
    unit = w.block[0] if isinstance(w, QArray) else 1  # rows per scale block
    if len(w.shape) != 2 or n % unit:
        return plain_linear(x, w, dtype)
    blocks = n // unit
    per_slice = max(1, min(blocks, slice_bytes // (unit * k * _values(w).dtype.itemsize)))
    while blocks % per_slice:  # equal slices for the loop
        per_slice -= 1
    count, rows = blocks // per_slice, per_slice * unit
    x32 = x.astype(dtype).astype(jnp.float32)  # x rounded to the compute dtype, as `linear` does
    if count == 1:
        return plain_linear(x32, w, jnp.float32).astype(dtype)

    def body(i, out):
        # The barrier ties the weight to the iteration: XLA cannot hoist the conversion out of the loop.
        values, scales = jax.lax.optimization_barrier((_values(w), _scales(w), i))[:2]
        part = jax.lax.dynamic_slice_in_dim(values, i * rows, rows, 0)
        if scales is not None:  # `replace` keeps the weight's kind (fp8 or INT4)
            part = w.replace(values=part, scales=jax.lax.dynamic_slice_in_dim(scales, i * per_slice, per_slice, 0))
        return out.at[i].set(jnp.einsum("...i,oi->...o", x32, dequantize(part, jnp.float32)))

    out = jax.lax.fori_loop(0, count, body, jnp.zeros((count, *x.shape[:-1], rows), jnp.float32))
    return jnp.moveaxis(out, 0, -2).reshape(*x.shape[:-1], n).astype(dtype)


def _values(w: QArray | jax.Array) -> jax.Array:
    return w.values if isinstance(w, QArray) else w


def _scales(w: QArray | jax.Array) -> jax.Array | None:
    return w.scales if isinstance(w, QArray) else None


