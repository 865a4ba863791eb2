"""Where arrays live, as seen from the model: two hooks that layers call with *logical* names only.

The model never names a mesh axis. It calls
  * `layout.constrain(x, ("batch", "seq", "heads", None))` where an activation's placement matters;
  * `layout.experts(kernel)(x, weights, idx, gate, up, down)` to run the routed experts;
  * `layout.local(fn, in_axes, out_axes)(*args)` to run a per-device kernel on each device's shards.
This base class is one device: every hook changes nothing. `sharding.MeshLayout` maps the names to a
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

    def local(self, fn: Callable, in_axes: Sequence[Sequence[str | None]],
              out_axes: Sequence[Sequence[str | None]]) -> Callable:
        """Wrap `fn` to run on each device's shards of its arguments (logical `in_axes` per argument,
        `out_axes` per result leaf, in `jax.tree.leaves` order): for kernels that cannot be partitioned
        by the compiler (a Pallas call). `fn` must not reduce over a split axis."""
        return fn

    def __repr__(self) -> str:
        return "Layout(single device)"


UNSHARDED = Layout()
