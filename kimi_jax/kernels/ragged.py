"""The routed-expert row kernel for GPU and TPU: `jax.lax.ragged_dot` over expert-sorted rows.

ragged_dot multiplies each contiguous group of rows by its own expert's matrix, so at decode only
the chosen experts' weights are read. On CPU it is a masked dense product (~60x slower than the
grouped kernel), which is why the CPU backend does not use it. Tested against
`experts.reference_experts` (tests/test_moe.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kimi_jax.model.experts import SortedExperts
from kimi_jax.model.quant import dequantize


def ragged_rows(xs: jax.Array, experts: jax.Array, sizes: jax.Array, gate, up, down, dtype,
                layer: jax.Array | None = None) -> jax.Array:
    """Sorted rows xs [M, D] -> [M, D]; weights [E, out, in] transposed to ragged_dot's [E, in, out].

    Rows of experts held elsewhere sort last, past sum(sizes): whatever is computed there, the
    dispatch (`SortedExperts`) masks it out.
    """
    if layer is not None:
        gate, up, down = gate[layer], up[layer], down[layer]

    def mm(x, q):
        return jax.lax.ragged_dot(x, jnp.swapaxes(dequantize(q, dtype), 1, 2), sizes)

    xs = xs.astype(dtype)
    return mm(jax.nn.silu(mm(xs, gate)) * mm(xs, up), down)


RAGGED = SortedExperts(ragged_rows, "ragged")
