"""Routed experts: Σ_k w[n,k] · expert_{idx[n,k]}(x[n]), the simple reference and the sorted dispatch.

Every routed-experts kernel has one signature, `kernel(x [N, D], weights [N, k], idx [N, k], gate,
up, down, first_expert=0, out_dtype=None, layer=None) -> [N, D]`, with expert weights [E, out, in]
(plain or quantized), or with `layer` the whole MoE group's stacks [layers, E, out, in] of which
layer `layer` is used: a kernel then reads the experts it needs straight from the stack, where
slicing the layer out first would copy all of its experts (the layer loop passes the stacks whole
for that reason; see decoder.py). Under expert parallelism the weights hold only experts
[first_expert, first_expert + E) of a larger set; assignments to the others add nothing here (the
devices holding them add theirs). No kernel ever drops a token: buffers fit the case where every
assignment is local.

  * `reference_experts` — each expert on its tokens, one at a time: what every fast kernel is tested
    against, and (being plain and reverse-differentiable) what training runs.
  * `SortedExperts(rows)` — orders the N·k assignments by expert and hands the sorted rows to a
    backend's row kernel (kimi_jax/kernels: a tile-gathered einsum on CPU, `ragged_dot` on GPU/TPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kimi_jax.model.layers import swiglu

# rows(xs [M, D] sorted by expert, experts [M] (id E = held elsewhere, sorted last), sizes [E], gate, up,
# down, dtype, layer) -> [M, D]: each row through its own expert's SwiGLU.
RowsKernel = Callable[..., jax.Array]


def reference_experts(x: jax.Array, weights: jax.Array, idx: jax.Array, gate, up, down,
                      first_expert: int | jax.Array = 0, out_dtype=None, layer: jax.Array | None = None) -> jax.Array:
    """The simple loop: each (local) expert on every token, weighted by that token's routing weight."""
    if layer is not None:
        gate, up, down = gate[layer], up[layer], down[layer]  # QArray slices like an array
    out = jnp.zeros(x.shape, jnp.float32)
    for e in range(num_experts(gate)):
        w_e = jnp.where(idx == first_expert + e, weights, 0.0).sum(-1)  # (N,) combine weight of expert e
        out += w_e[:, None] * swiglu(x, gate[e], up[e], down[e]).astype(jnp.float32)
    return out.astype(out_dtype or x.dtype)


def num_experts(w, layer: jax.Array | None = None) -> int:
    """Experts held in `w` [E, out, in], or in the stack [L, E, out, in] when a layer is given."""
    return w.shape[0] if layer is None else w.shape[1]


def sort_assignments(idx: jax.Array, num_experts: int):
    """Order the N·k (token, expert) assignments by expert; returns (order, sorted experts, group sizes)."""
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return order, flat[order], jnp.bincount(flat, length=num_experts)


@dataclasses.dataclass(frozen=True)
class SortedExperts:
    """A routed-experts kernel over expert-sorted rows: sort the assignments, run `rows`, unsort, combine."""

    rows: RowsKernel
    name: str

    def __call__(self, x: jax.Array, weights: jax.Array, idx: jax.Array, gate, up, down,
                 first_expert: int | jax.Array = 0, out_dtype=None, layer: jax.Array | None = None) -> jax.Array:
        n, k = idx.shape
        num = num_experts(gate, layer)
        local = idx - first_expert
        mine = (local >= 0) & (local < num)  # (N, k)
        order, experts, sizes = sort_assignments(jnp.where(mine, local, num), num)  # others: id num, sorted last
        xs = x[order // k]  # (N·k, D), rows grouped by expert
        ys = self.rows(xs, experts, sizes, gate, up, down, x.dtype, layer)
        y = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)  # back to (token, choice) order
        y = jnp.where(mine[..., None], y.astype(jnp.float32), 0.0)
        return jnp.einsum("nkd,nk->nd", y, weights).astype(out_dtype or x.dtype)
