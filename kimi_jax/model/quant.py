"""Block-fp8 weights as a type, and the one matmul helper that takes plain or quantized weights.

The release stores each quantized linear weight W[out, in] as float8_e4m3fn values plus a float32
`weight_scale_inv` of shape [ceil(out/bo), ceil(in/bi)] (bo = bi = 128):
    W_real[i, j] = W_fp8[i, j] * scale_inv[i // bo, j // bi]
Edges can be ragged (kv_a_proj_with_mqa is [576, 7168] with scales [5, 56]).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import struct

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def storage_dtype(platform: str | None = None) -> np.dtype:
    """How fp8 values are held on a platform's devices: float8_e4m3fn, or its raw bytes as uint8 on CPU.

    XLA's CPU backend has no fp8 data movement: float normalization rewrites a dynamic-slice or
    gather of an fp8 array as the same op on an f16 copy of the *whole operand*, and loop-invariant
    code motion then hoists that copy out of the layer scan, so every scanned layer is materialised
    at 2 bytes per value (measured: temp memory 2x the fp8 stack). Integer data movement has no such
    rewrite, so on CPU the same bytes are kept as uint8 and bit-cast back to fp8 only where one
    layer's (or one expert tile's) weights are dequantized. GPU and TPU keep float8_e4m3fn.
    """
    return np.dtype(np.uint8) if (platform or jax.default_backend()) == "cpu" else np.dtype(ml_dtypes.float8_e4m3fn)


def to_storage(values: np.ndarray, platform: str | None = None) -> np.ndarray:
    """A zero-copy view of host fp8 values in the platform's storage dtype (see `storage_dtype`)."""
    return values.view(storage_dtype(platform)) if values.dtype == np.dtype(ml_dtypes.float8_e4m3fn) else values


def fp8_to_float32(values: jax.Array) -> jax.Array:
    """float8_e4m3fn values, from either storage form, as float32 (exact: every fp8 value is an f32).

    Raw bytes (CPU storage) are decoded with integer arithmetic that vectorises: for a normal number
    the 7 magnitude bits shifted into place are the f32 bit pattern up to the exponent bias
    (127 − 7 = 120); a subnormal (exponent 0) is its 3 mantissa bits times 2⁻⁹; 0x7F is NaN. XLA's
    CPU convert from float8 runs element by element, 2.5× slower inside a matvec (measured).
    Checked against ml_dtypes on all 256 codes (tests/test_quant.py).
    """
    if values.dtype != jnp.uint8:
        return values.astype(jnp.float32)
    bits = values.astype(jnp.uint32)
    mag = bits & 0x7F
    normal = jax.lax.bitcast_convert_type((mag << 20) + (120 << 23), jnp.float32)
    v = jnp.where(mag >= 8, normal, mag.astype(jnp.float32) * (2.0 ** -9))
    v = jnp.where(mag == 0x7F, jnp.nan, v)
    return jnp.where(bits >= 0x80, -v, v)


@struct.dataclass
class QArray:
    """A block-fp8 weight: `values` [..., out, in] fp8 and `scales` [..., ceil(out/bo), ceil(in/bi)] f32.

    `values` is float8_e4m3fn, or the same bytes as uint8 on CPU devices (see `storage_dtype`).

    Leading dimensions (layers, experts) are shared by both leaves, so a stacked QArray slices like
    an array: `w[i]` is layer i's weight.
    """

    values: jax.Array
    scales: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def block(self) -> tuple[int, int]:
        return block_size(self.values.shape[-2:], self.scales.shape[-2:])

    def __getitem__(self, index) -> QArray:
        return QArray(self.values[index], self.scales[index])


def block_size(shape: tuple[int, int], scale_shape: tuple[int, int]) -> tuple[int, int]:
    """The (rows, cols) block that maps `shape` to `scale_shape`, assuming the release's 128 when ambiguous."""
    out = []
    for n, s in zip(shape, scale_shape):
        b = 128
        if math.ceil(n / b) != s:  # a non-128 block (tests use small ones): the smallest that fits
            b = math.ceil(n / s)
        out.append(b)
    return tuple(out)


def dequantize(w: QArray | jax.Array, dtype=jnp.float32) -> jax.Array:
    """W_fp8 · scale_inv broadcast over its block, in float32, then cast to `dtype`.

    The optimization barrier keeps XLA from rewriting convert(slice(stack)) as slice(convert(stack)):
    inside a layer scan that rewrite hoists the conversion of every layer's weights out of the loop
    and materialises the whole stack in high precision (measured on CPU).
    """
    if not isinstance(w, QArray):
        return w.astype(dtype)
    values, scales = jax.lax.optimization_barrier((w.values, w.scales))
    rows, cols = values.shape[-2:]
    br, bc = w.block
    s = jnp.repeat(jnp.repeat(scales, br, axis=-2)[..., :rows, :], bc, axis=-1)[..., :cols]
    return (fp8_to_float32(values) * s).astype(dtype)


def linear(x: jax.Array, w: QArray | jax.Array, dtype=None) -> jax.Array:
    """x[..., in] @ W[out, in]ᵀ -> [..., out] for a plain or block-fp8 weight, computed in `dtype` (x's by default)."""
    dtype = dtype or x.dtype
    return jnp.einsum("...i,oi->...o", x.astype(dtype), dequantize(w, dtype))


STREAM_SLICE_BYTES = 2 << 20  # weight bytes per slice: the best of 0.5-8 MiB on the CPU bench config (BENCHMARKS.md)


def streamed_linear(x: jax.Array, w: QArray | jax.Array, dtype=None,
                    slice_bytes: int = STREAM_SLICE_BYTES) -> jax.Array:
    """`linear` for a few rows of x on CPU: W converted and multiplied one slice of output rows at a time.

    XLA's CPU backend fuses no conversion into a dot: `linear` writes the whole converted weight
    (fp8 -> float32, or bf16 -> float32 for its f32 dot) to memory and reads it back, about 9 bytes
    moved per fp8 value where the product needs 1. Here each slice's conversion is still in cache
    when its dot reads it. The arithmetic is float32 throughout (the fp8 values times their scales
    are exact in float32), rounded to `dtype` once at the end. Slices are whole scale blocks; a
    weight that cannot be cut so falls back to `linear`.
    """
    dtype = dtype or x.dtype
    n, k = w.shape[-2:]
    unit = w.block[0] if isinstance(w, QArray) else 1  # rows per scale block
    if len(w.shape) != 2 or n % unit:
        return linear(x, w, dtype)
    blocks = n // unit
    per_slice = max(1, min(blocks, slice_bytes // (unit * k * _values(w).dtype.itemsize)))
    while blocks % per_slice:  # equal slices for the loop
        per_slice -= 1
    count, rows = blocks // per_slice, per_slice * unit
    x32 = x.astype(dtype).astype(jnp.float32)  # x rounded to the compute dtype, as `linear` does
    if count == 1:
        return linear(x32, w, jnp.float32).astype(dtype)

    def body(i, out):
        # The barrier ties the weight to the iteration: XLA cannot hoist the conversion out of the loop.
        values, scales = jax.lax.optimization_barrier((_values(w), _scales(w), i))[:2]
        part = jax.lax.dynamic_slice_in_dim(values, i * rows, rows, 0)
        if scales is not None:
            part = QArray(part, jax.lax.dynamic_slice_in_dim(scales, i * per_slice, per_slice, 0))
        return out.at[i].set(jnp.einsum("...i,oi->...o", x32, dequantize(part, jnp.float32)))

    out = jax.lax.fori_loop(0, count, body, jnp.zeros((count, *x.shape[:-1], rows), jnp.float32))
    return jnp.moveaxis(out, 0, -2).reshape(*x.shape[:-1], n).astype(dtype)


def _values(w: QArray | jax.Array) -> jax.Array:
    return w.values if isinstance(w, QArray) else w


def _scales(w: QArray | jax.Array) -> jax.Array | None:
    return w.scales if isinstance(w, QArray) else None


# Quantizer (host side, numpy) -------------------------------------------------------------------
def quantize_block_fp8(w: np.ndarray, block: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """Quantize W[..., out, in] (any float dtype) to (fp8 values, float32 scale_inv) as DeepSeek does.

    Each block's scale_inv is amax(|block|) / 448 so the block's largest magnitude maps to the fp8
    maximum; an all-zero block gets scale 1. Returns arrays ready to write as `weight` and
    `weight_scale_inv`.
    """
    w = np.asarray(w, dtype=np.float32)
    *lead, rows, cols = w.shape
    br, bc = block
    nr, nc = math.ceil(rows / br), math.ceil(cols / bc)
    padded = np.zeros((*lead, nr * br, nc * bc), np.float32)
    padded[..., :rows, :cols] = w
    blocks = padded.reshape(*lead, nr, br, nc, bc)
    amax = np.abs(blocks).max(axis=(-3, -1))  # [..., nr, nc]
    scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    q = blocks / scale[..., :, None, :, None]
    values = q.reshape(*lead, nr * br, nc * bc)[..., :rows, :cols].astype(ml_dtypes.float8_e4m3fn)
    return values, scale


def dequantize_np(values: np.ndarray, scales: np.ndarray, block: tuple[int, int] | None = None) -> np.ndarray:
    """Host-side dequantization to float32 (the reference the tests and the HF oracle use)."""
    rows, cols = values.shape[-2:]
    br, bc = block or block_size((rows, cols), scales.shape[-2:])
    s = np.repeat(np.repeat(scales, br, axis=-2)[..., :rows, :], bc, axis=-1)[..., :cols]
    return values.astype(np.float32) * s
