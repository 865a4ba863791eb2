"""Routed experts: Σ_k w[n,k] · expert_{idx[n,k]}(x[n]), the simple reference and the sorted dispatch.

Every routed-experts kernel has one signature, `kernel(x [N, D], weights [N, k], idx [N, k], gate,
up, down, first_expert=0, out_dtype=None) -> [N, D]`, with expert weights [E, out, in] (plain or
block-fp8). Under expert parallelism the weights hold only experts [first_expert, first_expert + E)
of a larger set; assignments to the others add nothing here (the devices holding them add theirs).
No kernel ever drops a token: buffers fit the case where every assignment is local.

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
# down, dtype) -> [M, D]: each row through its own expert's SwiGLU.
RowsKernel = Callable[..., jax.Array]


def reference_experts(x: jax.Array, weights: jax.Array, idx: jax.Array, gate, up, down,
                      first_expert: int | jax.Array = 0, out_dtype=None) -> jax.Array:
    """The simple loop: each (local) expert on every token, weighted by that token's routing weight."""
    out = jnp.zeros(x.shape, jnp.float32)
    for e in range(gate.shape[0]):
        w_e = jnp.where(idx == first_expert + e, weights, 0.0).sum(-1)  # (N,) combine weight of expert e
        out += w_e[:, None] * swiglu(x, gate[e], up[e], down[e]).astype(jnp.float32)  # QArray slices like an array
    return out.astype(out_dtype or x.dtype)


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
                 first_expert: int | jax.Array = 0, out_dtype=None) -> jax.Array:
        n, k = idx.shape
        num = gate.shape[0]
        local = idx - first_expert
        mine = (local >= 0) & (local < num)  # (N, k)
        order, experts, sizes = sort_assignments(jnp.where(mine, local, num), num)  # others: id num, sorted last
        xs = x[order // k]  # (N·k, D), rows grouped by expert
        ys = self.rows(xs, experts, sizes, gate, up, down, x.dtype)
        y = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)  # back to (token, choice) order
        y = jnp.where(mine[..., None], y.astype(jnp.float32), 0.0)
        return jnp.einsum("nkd,nk->nd", y, weights).astype(out_dtype or x.dtype)
