"""The model's elementwise pieces: RMSNorm, YaRN rotary embeddings (interleaved layout) and its softmax
scale, and SwiGLU. Pure functions; every piece of YaRN lives here."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.config import Config
from kimi_jax.model.quant import linear


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) · weight, the statistics in float32 (as DeepSeek and Hugging Face compute them)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_inv_freq(cfg: Config) -> np.ndarray:
    """Inverse frequencies [qk_rope_head_dim / 2], YaRN-blended when the config scales rope.

    YaRN keeps high frequencies (many rotations within the original context) as they are and
    divides low frequencies by `factor`, with a linear ramp between the dims where a frequency
    makes `beta_fast` and `beta_slow` rotations over the original context.
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freq = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    r = cfg.rope_scaling
    if r is None:
        return freq

    def correction_dim(rotations: float) -> float:
        return dim * math.log(r.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(r.beta_fast)), 0)
    high = min(math.ceil(correction_dim(r.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp becomes a step
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1.0 - ramp  # 1: extrapolate (original frequency); 0: interpolate (freq / factor)
    return (freq / r.factor) * (1 - keep) + freq * keep


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's magnitude correction 0.1 · mscale · ln(factor) + 1 (1 without scaling)."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def rope_attention_factor(cfg: Config) -> float:
    """YaRN's cos/sin multiplier: mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1.0 for Kimi-K2)."""
    r = cfg.rope_scaling
    if r is None or r.factor <= 1:
        return 1.0
    if r.mscale and r.mscale_all_dim:
        return yarn_mscale(r.factor, r.mscale) / yarn_mscale(r.factor, r.mscale_all_dim)
    return yarn_mscale(r.factor, 1.0)


def softmax_scale(cfg: Config) -> float:
    """(qk_nope + qk_rope)^-0.5, times mscale(factor, mscale_all_dim)² under YaRN (as DeepSeek and HF do)."""
    r = cfg.rope_scaling
    m = yarn_mscale(r.factor, r.mscale_all_dim) if r is not None and r.mscale_all_dim else 1.0
    return cfg.qk_head_dim ** -0.5 * m * m


def rope_angles(cfg: Config, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [..., rope_dim / 2] (float32) for integer `positions` [...]."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    factor = rope_attention_factor(cfg)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, T, (H,) R] by the angles [B, T, R/2].

    The output is de-interleaved ([rotated evens, rotated odds]), as Hugging Face's DeepseekV3
    does; queries and keys get the same permutation, so their dot products are unchanged, and the
    cache stores keys in this layout.
    """
    while cos.ndim < x.ndim:  # broadcast over the head axis
        cos, sin = cos[..., None, :], sin[..., None, :]
    x32 = x.astype(jnp.float32)
    even, odd = x32[..., 0::2], x32[..., 1::2]
    out = jnp.concatenate([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return out.astype(x.dtype)


def swiglu(x: jax.Array, gate, up, down, product: Callable = linear) -> jax.Array:
    """down(silu(gate(x)) · up(x)) for plain or block-fp8 weights; `product(x, w)` is the matmul
    (`quant.linear`, or a backend's `linear`)."""
    return product(jax.nn.silu(product(x, gate)) * product(x, up), down)
