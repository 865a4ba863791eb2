"""Quantized weights as a type (block-fp8 and packed INT4), their quantizers and dequantizers, and the
plain products that take a plain or quantized weight.

Two kinds of `QArray`, told apart by its static `kind`:

* "fp8" (Kimi-K2-Instruct, DeepSeek-V3): each linear weight W[out, in] is float8_e4m3fn values plus a
  float32 `weight_scale_inv` of shape [ceil(out/bo), ceil(in/bi)] (bo = bi = 128):
      W_real[i, j] = W_fp8[i, j] * scale_inv[i // bo, j // bi]
  Edges can be ragged (kv_a_proj_with_mqa is [576, 7168] with scales [5, 56]).
* "int4" (Kimi-K2-Thinking, K2.5, K2.6: compressed-tensors `pack-quantized`, symmetric, groups of g
  = 32 along the input dim): `values` are int32 words [out, in/8], element 8k+j of a row in bits
  4j..4j+3 of word k (low nibble first) stored as q + 8; `scales` bf16 [out, ceil(in/g)]:
      W_real[o, i] = (nibble(o, i) - 8) * scale[o, i // g]
  Half a byte per value plus a bf16 scale per 32 (0.5625 bytes per parameter).
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
FP8_KIND, INT4 = "fp8", "int4"  # QArray kinds
INT4_PER_WORD = 8  # nibbles per int32 word
INT4_GROUP = 32  # compressed-tensors' (and Kimi's) group size


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


def fp8_values(values: jax.Array, dtype) -> jax.Array:
    """fp8 values, in either storage form, converted to `dtype` unscaled: a convert that XLA on TPU
    fuses into the dot reading it (a multiply by the block scales it does not fuse), so a product
    that applies the scales elsewhere reads the weight once, as fp8."""
    return (values if values.dtype != jnp.uint8 else fp8_to_float32(values)).astype(dtype)


@struct.dataclass
class QArray:
    """A quantized weight of logical shape [..., out, in] (module docstring): `kind` "fp8" (default) or "int4".

    fp8: `values` [..., out, in] float8_e4m3fn, or the same bytes as uint8 where the backend stores
    fp8 so (`Backend.fp8_storage`: CPU; `fp8_to_float32` reads either), `scales`
    [..., ceil(out/bo), ceil(in/bi)] float32. int4: `values` [..., out, in/8] int32 words, `scales`
    [..., out, ceil(in/g)] bfloat16.

    `kind` is static (pytree metadata), so it survives jit, tree maps and shardings. Leading
    dimensions (layers, experts) are shared by both leaves, so a stacked QArray slices like an
    array: `w[i]` is layer i's weight. The same type also carries a pair of shardings or specs.
    """

    values: jax.Array
    scales: jax.Array
    kind: str = struct.field(pytree_node=False, default=FP8_KIND)

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical [..., out, in] shape (INT4: 8 values per stored word)."""
        if self.kind == INT4:
            return (*self.values.shape[:-1], self.values.shape[-1] * INT4_PER_WORD)
        return self.values.shape

    @property
    def block(self) -> tuple[int, int]:
        """(rows, cols) of the weight that share one scale: 128×128 for the release's fp8, (1, 32) for INT4."""
        if self.kind == INT4:
            return 1, int4_group(self.shape[-1], self.scales.shape[-1])
        return block_size(self.values.shape[-2:], self.scales.shape[-2:])

    def __getitem__(self, index) -> QArray:
        return QArray(self.values[index], self.scales[index], self.kind)


def int4_group(cols: int, groups: int) -> int:
    """Input columns per INT4 scale: 32 when the shapes allow it, else the smallest that fits (1 when a
    sharded copy holds one scale per column, `sharding.layout.local_blocks`)."""
    return INT4_GROUP if math.ceil(cols / INT4_GROUP) == groups else math.ceil(cols / groups)


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
    """W_fp8 · scale_inv broadcast over its block (by reshape), in float32, then cast to `dtype`.

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
    if w.kind == INT4:
        return dequantize_int4(w, dtype)
    xp = _xp(w.values)
    values, scales = (w.values, w.scales) if xp is np else jax.lax.optimization_barrier((w.values, w.scales))
    *lead, rows, cols = values.shape
    br, bc = block or w.block
    nr, nc = scales.shape[-2:]
    decoded = values.astype(np.float32) if xp is np else fp8_to_float32(values)
    if (nr * br, nc * bc) != (rows, cols):  # ragged edge blocks: pad to whole blocks, cut off after
        decoded = xp.pad(decoded, [(0, 0)] * len(lead) + [(0, nr * br - rows), (0, nc * bc - cols)])
    # The scales broadcast over their blocks by a reshape: no full-size scale array is ever built.
    blocks = decoded.reshape(*lead, nr, br, nc, bc) * scales[..., :, None, :, None]
    return blocks.reshape(*lead, nr * br, nc * bc)[..., :rows, :cols].astype(dtype)


# INT4 (compressed-tensors pack-quantized) ------------------------------------------------------
def unpack_int4(words):
    """int32 words [..., n] -> their signed nibbles [..., 8n] in −8..7 (int32), low nibble first."""
    xp = _xp(words)
    shifts = xp.arange(0, 32, 4, dtype=np.int32)
    nibbles = (words[..., None] >> shifts) & 0xF  # (..., n, 8); the mask undoes the arithmetic shift's sign
    return nibbles.reshape(*words.shape[:-1], words.shape[-1] * INT4_PER_WORD) - 8


def pack_int4(q):
    """Signed INT4 values [..., 8n] in −8..7 -> int32 words [..., n] as compressed-tensors packs them."""
    xp = _xp(q)
    *lead, cols = q.shape
    if cols % INT4_PER_WORD:
        raise ValueError(f"INT4 packing needs whole words: {cols} columns is not a multiple of {INT4_PER_WORD}")
    nibbles = (q.astype(np.int32) + 8).astype(np.uint32).reshape(*lead, cols // INT4_PER_WORD, INT4_PER_WORD)
    words = (nibbles << xp.arange(0, 32, 4, dtype=np.uint32)).sum(axis=-1, dtype=np.uint32)  # disjoint bits
    return words.view(np.int32) if xp is np else jax.lax.bitcast_convert_type(words, jnp.int32)


def dequantize_int4(w: QArray, dtype=jnp.float32):
    """An INT4 QArray -> [..., out, in] in `dtype`: nibble − 8 times its group's scale, in float32.

    float32 because an int4 times a bf16 scale is not always a bf16 (dequantizing in bf16 moved
    float32 logits by ~2e-3 relative). The scales multiply whole groups (a reshape, no broadcast
    copy of the scales). The optimization barrier is `dequantize`'s: it keeps the unpacking of one
    layer's (one tile's) words from being hoisted out of the layer scan.
    """
    xp = _xp(w.values)
    values, scales = (w.values, w.scales) if xp is np else jax.lax.optimization_barrier((w.values, w.scales))
    q = unpack_int4(values).astype(np.float32)  # (..., out, in)
    *lead, rows, cols = q.shape
    groups, size = scales.shape[-1], w.block[1]
    if groups * size != cols:  # a ragged last group: pad it, multiply whole groups, cut the padding off
        q = xp.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, groups * size - cols)])
    deq = q.reshape(*lead, rows, groups, size) * scales.astype(np.float32)[..., None]
    return deq.reshape(*lead, rows, groups * size)[..., :cols].astype(dtype)


def quantize_int4(w, group: int = INT4_GROUP):
    """Quantize W[..., out, in] to INT4 (int32 words, bf16 scales), symmetric per group of `group` inputs.

    scale = amax/7 per group, rounded to bf16 first so that q = round(W / scale) is exact for the
    stored scale; an all-zero group gets scale 1. For tests, random weights and `Module.init`; real
    INT4 checkpoints come quantized (and the tests write theirs with compressed-tensors).
    """
    xp = _xp(w)
    w = xp.asarray(w).astype(np.float32)
    *lead, rows, cols = w.shape
    groups = math.ceil(cols / group)
    blocks = xp.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, groups * group - cols)]).reshape(*lead, rows, groups, group)
    amax = xp.abs(blocks).max(axis=-1)  # (..., out, groups)
    scale = xp.where(amax > 0, amax / 7.0, 1.0).astype(ml_dtypes.bfloat16)
    q = xp.clip(xp.round(blocks / scale.astype(np.float32)[..., None]), -8, 7)
    return pack_int4(q.reshape(*lead, rows, groups * group)[..., :cols].astype(np.int32)), scale


def linear(x: jax.Array, w: QArray | jax.Array, dtype=None) -> jax.Array:
    """x[..., in] @ W[out, in]ᵀ -> [..., out] for a plain or quantized weight, computed in `dtype` (x's by default)."""
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
