"""Mixture of experts: the noaux_tc router, routed experts, and the shared expert (DeepSeek-V3 §2.1.2).

Routing: s = sigmoid(x W_rᵀ) in float32. Experts are *selected* on s + e_score_correction_bias
(restricted to the `topk_group` best groups, a group scoring the sum of its two best biased
scores); the combine weights are the *unbiased* s of the chosen experts, normalised to sum 1 and
scaled by routed_scaling_factor. The shared expert is added unweighted.

No token is ever dropped: the expert kernels size their buffers for the worst case, so the output
never depends on how tokens happen to be distributed. The kernel is chosen per backend in one
place (`expert_backend`):
  * "ragged"  — `jax.lax.ragged_dot` over expert-sorted tokens (GPU/TPU);
  * "grouped" — tokens sorted by expert into fixed-size tiles, each tile multiplied by its expert's
    weights, gathered (CPU, where ragged_dot is a masked dense product ~60x slower). At decode a
    tile is one token, so only the experts actually chosen are read from memory.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from kimi_jax.config import Config
from kimi_jax.model.layers import swiglu
from kimi_jax.model.layout import UNSHARDED, Layout
from kimi_jax.model.quant import dequantize
from kimi_jax.model.weights import declare, moe_specs

BACKENDS = ("grouped", "ragged")


def expert_backend(platform: str | None = None) -> str:
    """The routed-expert kernel for a platform (default: JAX's default backend)."""
    platform = platform or jax.default_backend()
    return "grouped" if platform == "cpu" else "ragged"


def route(x: jax.Array, w_router: jax.Array, bias: jax.Array, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """x [N, D] -> (combine weights [N, k] float32, expert ids [N, k] int32)."""
    scores = jax.nn.sigmoid(jnp.einsum("nd,ed->ne", x.astype(jnp.float32), w_router.astype(jnp.float32)))
    choice = scores + bias.astype(jnp.float32)
    if cfg.n_group > 1:
        n, e = choice.shape
        grouped = choice.reshape(n, cfg.n_group, e // cfg.n_group)  # (N, G, E/G)
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # (N, G)
        _, keep = jax.lax.top_k(group_score, cfg.topk_group)
        group_mask = jnp.zeros_like(group_score, bool).at[jnp.arange(n)[:, None], keep].set(True)
        choice = jnp.where(group_mask[:, :, None], grouped, -jnp.inf).reshape(n, e)
    _, idx = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, idx.astype(jnp.int32)


def _sort_assignments(idx: jax.Array, num_experts: int):
    """Order the N·k (token, expert) assignments by expert; returns (order, sorted experts, group sizes)."""
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return order, flat[order], jnp.bincount(flat, length=num_experts)


def tile_rows(assignments: int, num_experts: int) -> int:
    """Rows per tile for the grouped kernel.

    Each tile costs one gather of an expert's weights (≈ a few rows of compute on CPU) plus its
    rows; padding wastes up to tile−1 rows per active expert. sqrt(4·N/E) balances the two; at
    decode (N ≈ k) it is 1, so exactly the chosen experts are read.
    """
    m = math.sqrt(4 * assignments / num_experts)
    return 1 if m < 1.5 else 2 ** round(math.log2(m))


# Dequantized weight bytes one chunk of tiles may hold (float32 on CPU, gate + up + down).
CHUNK_BYTES = 32 << 20


# At least this many chunks once there are that many tiles: the loop runs only the chunks that hold
# rows, so finer chunks skip more of the worst-case padding (under expert parallelism most tiles are
# another device's experts' and stay empty: measured 4-12x faster on 8 fake devices, sharding/DESIGN.md).
MIN_CHUNKS = 16


def tile_chunk(n_tiles: int, weight_elems: int) -> int:
    """Tiles per chunk: as many as fit CHUNK_BYTES of dequantized float32 weights, at least 1."""
    return max(1, min(n_tiles, CHUNK_BYTES // (3 * 4 * weight_elems), -(-n_tiles // MIN_CHUNKS)))


def _grouped(xs: jax.Array, experts: jax.Array, sizes: jax.Array, gate, up, down, dtype) -> jax.Array:
    """Sorted rows xs [M, D] with their expert ids -> expert outputs [M, D], via per-tile gathers."""
    rows, num_experts = xs.shape[0], sizes.shape[0]
    m = tile_rows(rows, num_experts)
    # Worst case over any distribution: each active expert wastes < m rows of its last tile.
    n_tiles = (rows + (m - 1) * min(num_experts, rows)) // m
    tiles_per = (sizes + m - 1) // m
    tile_end = jnp.cumsum(tiles_per)
    row_start = jnp.cumsum(sizes) - sizes
    slot = (tile_end - tiles_per)[experts] * m + jnp.arange(rows) - row_start[experts]  # padded row of each row
    # Rows of experts held elsewhere (id == num_experts, sorted last) get no slot: dropped, read back as 0.
    slot = jnp.where(experts < num_experts, slot, n_tiles * m)
    xp = jnp.zeros((n_tiles * m, xs.shape[1]), dtype).at[slot].set(xs.astype(dtype), mode="drop")
    # Tiles past the last used one get the last expert id; their rows are zeros and never read back.
    tile_expert = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(n_tiles), side="right"), num_experts - 1)

    # Tiles run in chunks, so only one chunk's dequantized weights exist at a time (at prefill the
    # tiles outnumber the experts: dequantizing them all at once would cost several times the
    # layer's fp8 bytes), and chunks past the last used tile are skipped (see MIN_CHUNKS).
    chunk = tile_chunk(n_tiles, gate.shape[-2] * gate.shape[-1])
    n_chunks = -(-n_tiles // chunk)
    pad = n_chunks * chunk - n_tiles
    xt = jnp.pad(xp.reshape(n_tiles, m, -1), ((0, pad), (0, 0), (0, 0))).reshape(n_chunks, chunk, m, -1)
    te = jnp.pad(tile_expert, (0, pad), constant_values=num_experts - 1).reshape(n_chunks, chunk)

    # With few tiles (decode), the tiles' weights are gathered here, before the loop, in storage dtype.
    # Gathered inside the loop, they would be read from a buffer holding the layer's whole expert
    # stack, which XLA then copies out of the scanned stack every step (measured on CPU: 3 copies of
    # 33 MB per layer per decode step, ~45% of the step).
    pregather = 2 * n_chunks * chunk <= num_experts
    if pregather:
        gate, up, down = jax.tree.map(lambda a: jnp.asarray(a)[te], (gate, up, down))  # (n_chunks, chunk, ...)

    def run_chunk(c, yt):
        x, ids = xt[c], te[c]  # (chunk, m, D), (chunk,)

        def w(q):  # the chunk's expert weights, gathered in storage dtype (fp8 bytes) then dequantized
            return dequantize(jax.tree.map(lambda a: jnp.asarray(a)[c] if pregather else jnp.asarray(a)[ids], q),
                              jnp.float32)

        x = x.astype(jnp.float32)
        h = jax.nn.silu(jnp.einsum("tmd,tid->tmi", x, w(gate))) * jnp.einsum("tmd,tid->tmi", x, w(up))
        return yt.at[c].set(jnp.einsum("tmi,tdi->tmd", h.astype(dtype).astype(jnp.float32), w(down)).astype(dtype))

    # Only the chunks holding rows run (a dynamic trip count); the rest stay zero and are never read.
    used = (tile_end[-1] + chunk - 1) // chunk
    yt = jax.lax.fori_loop(0, used, run_chunk, jnp.zeros_like(xt))
    return yt.reshape(n_chunks * chunk * m, -1).at[slot].get(mode="fill", fill_value=0)


def _ragged(xs: jax.Array, experts: jax.Array, sizes: jax.Array, gate, up, down, dtype) -> jax.Array:
    """Sorted rows xs [M, D] -> [M, D] with `jax.lax.ragged_dot` (weights [E, out, in] transposed to [E, in, out])."""
    def mm(x, q):
        return jax.lax.ragged_dot(x, jnp.swapaxes(dequantize(q, dtype), 1, 2), sizes)

    xs = xs.astype(dtype)
    return mm(jax.nn.silu(mm(xs, gate)) * mm(xs, up), down)


def routed_experts(x: jax.Array, weights: jax.Array, idx: jax.Array, gate, up, down,
                   backend: str = "grouped", first_expert: int | jax.Array = 0, out_dtype=None) -> jax.Array:
    """Σ_k weights[n,k] · expert_{idx[n,k]}(x[n]) for x [N, D]; experts' weights [E, out, in].

    Expert parallelism: `gate/up/down` may hold only experts [first_expert, first_expert + E) of a
    larger set; assignments to the others add nothing here (the devices holding them add theirs).
    Buffers still fit the case where every assignment is local, so nothing is ever dropped.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown expert backend {backend!r}; choose one of {BACKENDS}")
    n, k = idx.shape
    num = gate.shape[0]
    local = idx - first_expert
    mine = (local >= 0) & (local < num)  # (N, k)
    order, experts, sizes = _sort_assignments(jnp.where(mine, local, num), num)  # others: id num, sorted last
    xs = x[order // k]  # (N·k, D), rows grouped by expert
    kernel = _grouped if backend == "grouped" else _ragged
    ys = kernel(xs, experts, sizes, gate, up, down, x.dtype)
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)  # back to (token, choice) order
    y = jnp.where(mine[..., None], y.astype(jnp.float32), 0.0)
    return jnp.einsum("nkd,nk->nd", y, weights).astype(out_dtype or x.dtype)


def reference_experts(x: jax.Array, weights: jax.Array, idx: jax.Array, gate, up, down) -> jax.Array:
    """The simple loop every kernel is tested against: each expert on its tokens, one at a time."""
    out = jnp.zeros(x.shape, jnp.float32)
    for e in range(gate.shape[0]):
        w_e = jnp.where(idx == e, weights, 0.0).sum(-1)  # (N,) combine weight of expert e
        out += w_e[:, None] * swiglu(x, gate[e], up[e], down[e]).astype(jnp.float32)  # QArray slices like an array
    return out.astype(x.dtype)


class MoE(nn.Module):
    """Routed experts plus the shared expert, for x [B, T, D]."""

    cfg: Config
    backend: str | None = None  # None: `expert_backend()` for the default platform
    layout: Layout = UNSHARDED  # where the experts run (sharding.MeshLayout: expert-parallel)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = declare(self, moe_specs(self.cfg), self.cfg)
        flat = x.reshape(-1, x.shape[-1])  # (B·T, D)
        weights, idx = route(flat, p["router"], p["router_bias"], self.cfg)
        routed = self.layout.experts(routed_experts)(flat, weights, idx, p["experts_gate"], p["experts_up"],
                                                     p["experts_down"], self.backend or expert_backend())
        shared = swiglu(flat, p["shared_gate"], p["shared_up"], p["shared_down"], self.layout.linear)
        return (routed + shared).reshape(x.shape)
