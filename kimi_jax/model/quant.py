"""Block-fp8 weights as a type, its quantizer and dequantizer, and the plain products that take either.

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


def to_storage(values: np.ndarray, storage: np.dtype) -> np.ndarray:
    """A zero-copy view of host fp8 values in a backend's storage dtype (`Backend.fp8_storage`: uint8 on CPU).

    Other arrays are returned as they are.
    """
    return values.view(storage) if values.dtype == np.dtype(ml_dtypes.float8_e4m3fn) else values


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

    `values` is float8_e4m3fn, or the same bytes as uint8 where the backend stores fp8 so
    (`Backend.fp8_storage`: CPU); `fp8_to_float32` reads either.

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


def _xp(a):
    """The array namespace of `a`: numpy for host arrays (checkpoint tools, the oracle), jnp otherwise."""
    return np if isinstance(a, np.ndarray) else jnp


def dequantize(w: QArray | jax.Array | np.ndarray, dtype=jnp.float32, block: tuple[int, int] | None = None):
    """W_fp8 · scale_inv broadcast over its block, in float32, then cast to `dtype`.

    `block`: the checkpoint's block size where known (config.weight_block_size); by default it is
    inferred from the shapes (`block_size`, exact for the release's 128×128 blocks). One
    implementation for device and host arrays: a QArray of numpy arrays (a checkpoint's tensors)
    dequantizes in numpy. On device, the optimization barrier keeps XLA from rewriting
    convert(slice(stack)) as slice(convert(stack)): inside a layer scan that rewrite hoists the
    conversion of every layer's weights out of the loop and materialises the whole stack in high
    precision (measured on CPU).
    """
    if not isinstance(w, QArray):
        return w.astype(dtype)
    xp = _xp(w.values)
    values, scales = (w.values, w.scales) if xp is np else jax.lax.optimization_barrier((w.values, w.scales))
    rows, cols = values.shape[-2:]
    br, bc = block or w.block
    s = xp.repeat(xp.repeat(scales, br, axis=-2)[..., :rows, :], bc, axis=-1)[..., :cols]
    decoded = values.astype(np.float32) if xp is np else fp8_to_float32(values)
    return (decoded * s).astype(dtype)


def linear(x: jax.Array, w: QArray | jax.Array, dtype=None) -> jax.Array:
    """x[..., in] @ W[out, in]ᵀ -> [..., out] for a plain or block-fp8 weight, computed in `dtype` (x's by default)."""
    dtype = dtype or x.dtype
    return jnp.einsum("...i,oi->...o", x.astype(dtype), dequantize(w, dtype))


def logits(x: jax.Array, lm_head: jax.Array, dtype) -> jax.Array:
    """x [..., D] @ lm_headᵀ [V, D] -> float32 logits [..., V], products in `dtype`, f32 accumulation."""
    return jnp.einsum("...d,vd->...v", x.astype(dtype), lm_head.astype(dtype), preferred_element_type=jnp.float32)


def quantize_block_fp8(w, block: tuple[int, int] = (128, 128)):
    """Quantize W[..., out, in] (any float dtype) to (fp8 values, float32 scale_inv) as DeepSeek does.

    Each block's scale_inv is amax(|block|) / FP8_MAX so the block's largest magnitude maps to the
    fp8 maximum; an all-zero block gets scale 1. Host (numpy) weights give numpy arrays ready to
    write as `weight` and `weight_scale_inv`; device (jax) weights give jax arrays (`Module.init`).
    """
    xp = _xp(w)
    w = xp.asarray(w).astype(np.float32)
    *lead, rows, cols = w.shape
    br, bc = block
    nr, nc = math.ceil(rows / br), math.ceil(cols / bc)
    pad = [(0, 0)] * len(lead) + [(0, nr * br - rows), (0, nc * bc - cols)]
    blocks = xp.pad(w, pad).reshape(*lead, nr, br, nc, bc)
    amax = xp.abs(blocks).max(axis=(-3, -1))  # [..., nr, nc]
    scale = xp.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    q = (blocks / scale[..., :, None, :, None]).reshape(*lead, nr * br, nc * bc)[..., :rows, :cols]
    return q.astype(ml_dtypes.float8_e4m3fn), scale
