"""Where arrays live, as seen from the model: two hooks that layers call with *logical* names only.

The model never names a mesh axis. It calls
  * `layout.constrain(x, ("batch", "seq", "heads", None))` where an activation's placement matters;
  * `layout.experts(kernel)(x, weights, idx, gate, up, down, backend)` to run the routed experts;
  * `layout.linear(x, w)` and `layout.logits(x, lm_head, dtype)` for the dense products.
This base class is one device: placement hooks change nothing, and on a CPU the dense products of
a few rows (decode) stream their weights (`quant.streamed_linear`); `sharding.MeshLayout` maps the
names to a device mesh through one rules table (and runs the experts expert-parallel), so the same
module code runs unsharded and sharded, with no switch inside a layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from kimi_jax.model.quant import QArray, linear, streamed_linear

# Products with at most this many rows of x stream their weight on a single CPU device: the decode
# regime, where reading the weight is the whole cost. Larger products (prefill, training) reuse each
# converted weight over many rows and run as one dot.
STREAM_MAX_ROWS = 64


class Layout:
    """Single-device layout: every hook is the identity."""

    def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
        """Place activation `x` by the logical names of its dimensions (None: not split)."""
        return x

    def experts(self, kernel: Callable) -> Callable:
        """Wrap the routed-expert kernel `kernel(x, weights, idx, gate, up, down, backend, ...)` (routed_experts)."""
        return kernel

    def streams(self, x: jax.Array) -> bool:
        """Whether a product with activation `x` streams its weight: one CPU device, few rows."""
        return jax.default_backend() == "cpu" and x.size // x.shape[-1] <= STREAM_MAX_ROWS

    def linear(self, x: jax.Array, w: QArray | jax.Array) -> jax.Array:
        """x[..., in] @ W[out, in]ᵀ in x's dtype, for a plain or block-fp8 weight (`quant.linear`)."""
        return streamed_linear(x, w) if self.streams(x) else linear(x, w)

    def logits(self, x: jax.Array, lm_head: jax.Array, dtype) -> jax.Array:
        """x [..., D] @ lm_headᵀ [V, D] -> float32 logits [..., V], products in `dtype`, f32 accumulation."""
        if self.streams(x):
            return streamed_linear(x.astype(dtype), lm_head, jnp.float32)
        return jnp.einsum("...d,vd->...v", x, lm_head.astype(dtype), preferred_element_type=jnp.float32)

    def __repr__(self) -> str:
        return "Layout(single device)"


UNSHARDED = Layout()
