"""The routed-expert row kernel for CPU: tokens sorted by expert into fixed-size tiles, one gather each.

XLA's CPU `ragged_dot` is a masked dense product (~60x slower), so on CPU the sorted rows are laid
out in tiles of `tile_rows` rows, each tile belonging to one expert, and each tile is multiplied by
its expert's weights, gathered in storage dtype and dequantized. At decode a tile is one token, so
only the experts actually chosen are read from memory. Buffers are sized for the worst case over
any token distribution, so nothing is ever dropped. Tested against `experts.reference_experts`,
adversarial distributions included (tests/test_moe.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kimi_jax.model.experts import SortedExperts
from kimi_jax.model.quant import dequantize


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


def grouped_rows(xs: jax.Array, experts: jax.Array, sizes: jax.Array, gate, up, down, dtype,
                 layer: jax.Array | None = None) -> jax.Array:
    """Sorted rows xs [M, D] with their expert ids -> expert outputs [M, D], via per-tile gathers
    (from layer `layer` of stacked weights [L, E, ...] when given)."""
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
    chunk = tile_chunk(n_tiles, math.prod(gate.shape[-2:]))
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
        gate, up, down = (take(w, layer, te) for w in (gate, up, down))  # (n_chunks, chunk, ...)

    def run_chunk(c, yt):
        x, ids = xt[c], te[c]  # (chunk, m, D), (chunk,)

        def w(q):  # the chunk's expert weights, gathered in storage dtype (fp8 bytes) then dequantized
            return dequantize(take(q, None, c) if pregather else take(q, layer, ids), jnp.float32)

        x = x.astype(jnp.float32)
        h = jax.nn.silu(jnp.einsum("tmd,tid->tmi", x, w(gate))) * jnp.einsum("tmd,tid->tmi", x, w(up))
        return yt.at[c].set(jnp.einsum("tmi,tdi->tmd", h.astype(dtype).astype(jnp.float32), w(down)).astype(dtype))

    # Only the chunks holding rows run (a dynamic trip count); the rest stay zero and are never read.
    used = (tile_end[-1] + chunk - 1) // chunk
    yt = jax.lax.fori_loop(0, used, run_chunk, jnp.zeros_like(xt))
    return yt.reshape(n_chunks * chunk * m, -1).at[slot].get(mode="fill", fill_value=0)



def take(w, layer: jax.Array | None, ids: jax.Array):
    """w[ids] (plain or quantized weights), or w[layer, ids] of a stack."""
    index = ids if layer is None else (layer, ids)
    return jax.tree.map(lambda a: jnp.asarray(a)[index], w)


GROUPED = SortedExperts(grouped_rows, "grouped")
