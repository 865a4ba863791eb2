"""Where arrays live, as seen from the model: two hooks that layers call with *logical* names only.

The model never names a mesh axis. It calls
  * `layout.constrain(x, ("batch", "seq", "heads", None))` where an activation's placement matters;
  * `layout.experts(kernel)(x, weights, idx, gate, up, down)` to run the routed experts.
This base class is one device: both hooks change nothing. `sharding.MeshLayout` maps the names to a
device mesh through one rules table (and runs the experts expert-parallel), so the same module
code runs unsharded and sharded, with no switch inside a layer. *How* products run is the
backend's business (`backend.py`), not the layout's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax


class Layout:
    """Single-device layout: every hook is the identity."""

    def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
        """Place activation `x` by the logical names of its dimensions (None: not split)."""
        return x

    def experts(self, kernel: Callable) -> Callable:
        """Wrap a routed-experts kernel (signature in `experts.py`) to run where the experts live."""
        return kernel

    def __repr__(self) -> str:
        return "Layout(single device)"


UNSHARDED = Layout()
