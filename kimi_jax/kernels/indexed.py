"""The routed experts at decode on GPU and TPU: each needed expert read by index, once, as fp8.

Decode holds few tokens (N = the batch), so the step must read only min(N·k, local experts) experts
(`runtime.must_read`). Two shapes of work, both reading each expert's weights straight out of the
MoE group's loop-invariant stacks by dynamic index (`scaled.index`) and multiplying them with
`scaled.product` (block scales on the activations: no dequantized copy of any weight):

  * assignments (N·k ≤ local experts): one item per (token, choice); an assignment to an expert held
    on another device reads a local expert to no effect, which is still within what must be read;
  * windows (more assignments than local experts): the assignments sorted by expert; every local
    expert runs once on a window of its first `window` rows, then a loop runs the windows left over
    (only experts that got more than `window` rows on this device: rare under balanced routing, and
    the only part whose trip count depends on the routing).

Larger steps (prefill) go to `ragged`, which dequantizes each expert once per layer and multiplies
expert-sorted rows with `ragged_dot`: there the flops matter and the weight is read once either way.
The item loops are unrolled so the compiler's cost analysis (which counts a loop body once) sees the
work; the leftover-window loop is a `while_loop`, counted once. Tested against
`experts.reference_experts` (tests/test_moe.py), skewed loads and remote experts included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kimi_jax.kernels import scaled
from kimi_jax.kernels.ragged import RAGGED
from kimi_jax.model.experts import num_experts, sort_assignments

# Rows per expert window: 8 rows times the block-scale expansion (16 for Kimi-K2) fill a 128-row pass.
WINDOW = 8

# Tokens above which a step is a prefill and goes to `ragged` (dequantize once per layer, ragged_dot).
MAX_DECODE_TOKENS = 256


def _swiglu(x: jax.Array, gate, up, down, dtype) -> jax.Array:
    """One expert on rows x [M, D] -> float32 [M, D]."""
    h = jax.nn.silu(scaled.product(x, gate, dtype)) * scaled.product(x, up, dtype)
    return scaled.product(h.astype(dtype), down, dtype)


def indexed_experts(x: jax.Array, weights: jax.Array, idx: jax.Array, gate, up, down,
                    first_expert: int | jax.Array = 0, out_dtype=None, layer: jax.Array | None = None) -> jax.Array:
    """The routed-experts kernel (signature in experts.py) that reads each needed expert once."""
    n, k = idx.shape
    if n > MAX_DECODE_TOKENS:
        return RAGGED(x, weights, idx, gate, up, down, first_expert, out_dtype, layer)
    held = num_experts(gate, layer)
    dtype = x.dtype
    local = idx - first_expert
    mine = (local >= 0) & (local < held)
    combine = jnp.where(mine, weights, 0.0).astype(jnp.float32)  # (N, k): 0 for other devices' experts

    def expert(e):
        return [scaled.index(w, layer, e) for w in (gate, up, down)]

    if n * k <= held:
        e_of = jnp.clip(local, 0, held - 1)
        rows = []
        for t in range(n):
            y = jnp.zeros((x.shape[1],), jnp.float32)
            for j in range(k):
                y = y + combine[t, j] * _swiglu(x[t:t + 1], *expert(e_of[t, j]), dtype)[0]
            rows.append(y)
        return jnp.stack(rows).astype(out_dtype or dtype)

    window = min(WINDOW, n)
    order, _, sizes = sort_assignments(jnp.where(mine, local, held), held + 1)  # others sort last
    start = jnp.cumsum(sizes) - sizes
    token_of = order // k  # sorted row -> its token
    weight_of = combine.reshape(-1)[order]
    out = jnp.zeros(x.shape, jnp.float32)

    def run(out, e, offset):  # expert e on its sorted rows [offset, offset + window)
        r = offset + jnp.arange(window)
        valid = r < start[e] + sizes[e]
        r = jnp.clip(r, 0, n * k - 1)
        tokens = token_of[r]
        y = _swiglu(x[tokens], *expert(e), dtype) * jnp.where(valid, weight_of[r], 0.0)[:, None]
        return out.at[tokens].add(y)

    for e in range(held):
        out = run(out, e, start[e])

    # Leftover windows: expert e's windows 1 .. ceil(size/window) - 1, numbered across experts.
    extra = jnp.maximum(0, -(-sizes[:held] // window) - 1)
    ends = jnp.cumsum(extra)

    def leftover(carry):
        i, out = carry
        e = jnp.searchsorted(ends, i, side="right")
        w = 1 + i - (ends[e] - extra[e])
        return i + 1, run(out, e, start[e] + w * window)

    _, out = jax.lax.while_loop(lambda c: c[0] < ends[-1], leftover, (jnp.zeros((), ends.dtype), out))
    return out.astype(out_dtype or dtype)


indexed_experts.name = "indexed"
