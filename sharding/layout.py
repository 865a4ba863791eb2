"""`MeshLayout`: the model's logical placement hooks mapped onto a device mesh by one rules table.

Attention, the dense MLP and the shared expert are left to the compiler (GSPMD, Auto axes): their
weights are placed by the rules (heads and the MLP's intermediate dim along `tensor`) and a few
`constrain` calls pin the activations (per-head tensors split by head, the batch along `data`).

The routed experts run in `jax.shard_map` (see DESIGN.md for why this strategy):
  * each device holds experts [first, first + E/expert) along `expert`, each expert's
    intermediate dim split along `tensor`;
  * it sees every token of its group (tokens are replicated over the group's axes, or gathered
    when the batch is split over one of them), routes them (cheap, replicated), runs the tokens
    assigned to *its* experts through the backend's expert kernel, and zeros the rest;
  * partial outputs are summed over the group: `psum` over the axes the batch is not split on,
    `psum_scatter` back to each device's tokens over those it is.
Buffers are sized for every assignment landing on one device, so no token is ever dropped and
the output never depends on a capacity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kimi_jax.config import KIMI_K2, Config
from kimi_jax.model.layout import Layout
from kimi_jax.model.quant import QArray
from kimi_jax.model.weights import Leaf, moe_specs
from sharding.mesh import MeshSpec, make_mesh
from sharding.rules import (
    RULES,
    Rules,
    activation_sharding,
    cache_shardings,
    get_rules,
    leaf_sharding,
    param_shardings,
    scale_spec,
)

TOKENS = ("batch", None)  # the MoE's flattened tokens [B·T, D]: B·T is split as the batch is


def local_blocks(q: QArray, values_spec: P, scales_spec: P, block: tuple[int, int]) -> QArray:
    """Inside shard_map: give a local weight shard the scales of exactly its own rows/columns.

    Where the values are split on a block dimension but the scales are replicated (shards are not
    whole blocks), each local row takes its block's scale: the scales become per-row on that
    dimension (block 1), which `dequantize` reads like any other block size. Rows and columns are
    the weight's logical ones (`q.shape`: an INT4 shard of w words holds 8·w columns).
    """
    scales = q.scales
    ndim = q.values.ndim
    for d, b in zip((ndim - 2, ndim - 1), block):
        v_axes, s_axes = _entry(values_spec, d), _entry(scales_spec, d)
        if v_axes and not s_axes:
            n = q.shape[d]  # local rows (or columns)
            first = jax.lax.axis_index(v_axes) * n
            scales = jnp.take(scales, (first + jnp.arange(n)) // b, axis=d)
    return q.replace(scales=scales)


def _entry(spec: P, d: int) -> tuple[str, ...]:
    e = spec[d] if d < len(spec) else None
    return () if e is None else (e,) if isinstance(e, str) else tuple(e)


@dataclasses.dataclass(frozen=True)
class MeshLayout(Layout):
    """Placement on `mesh` by `rules`; hashable (mesh and rules are), so modules and jit can hold it."""

    mesh: Mesh
    rules: Rules = RULES

    @classmethod
    def build(cls, mesh: MeshSpec, rules: Rules | str | None = None) -> MeshLayout:
        return cls(make_mesh(mesh), get_rules(rules))

    # Hooks the model calls ---------------------------------------------------------------------
    def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
        """with_sharding_constraint by logical names; a dimension that does not split evenly is left free."""
        spec = list(self.rules.spec(axes, "activation"))
        for d, entry in enumerate(spec):
            if entry is not None and x.shape[d] % _size(self.mesh, entry):
                spec[d] = None  # e.g. a batch of 1 at decode: a hint, not a requirement
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(*spec)))

    def experts(self, kernel: Callable) -> Callable:
        """The routed-expert kernel, run expert-parallel in shard_map (module docstring)."""
        mesh, rules = self.mesh, self.rules
        specs = moe_specs_axes()
        group = tuple(dict.fromkeys(rules.mesh_axes("experts") + rules.mesh_axes("expert_mlp")))
        token_axes = rules.mesh_axes("batch")
        gathered = tuple(a for a in token_axes if a in group)
        summed = tuple(a for a in group if a not in token_axes)
        expert_axes = rules.mesh_axes("experts")
        tok = rules.spec(TOKENS, "MoE tokens")

        def run(x, weights, idx, gate, up, down, layer=None):
            stacked = ("layers",) if layer is not None else ()  # the group's stacks, read at `layer`
            w_specs = [_weight_spec(w, rules.spec(stacked + specs[name], name), mesh) for name, w in
                       (("experts_gate", gate), ("experts_up", up), ("experts_down", down))]
            blocks = [w.block if isinstance(w, QArray) else None for w in (gate, up, down)]

            def body(x, weights, idx, layer, gate, up, down):
                if gathered:  # every token of the group, in group order
                    x, weights, idx = (jax.lax.all_gather(a, gathered, axis=0, tiled=True) for a in (x, weights, idx))
                ws = [local_blocks(w, s.values, s.scales, b) if isinstance(w, QArray) else w
                      for w, s, b in zip((gate, up, down), w_specs, blocks)]
                held = gate.shape[1] if stacked else gate.shape[0]  # experts on this device
                first = jax.lax.axis_index(expert_axes) * held if expert_axes else 0
                y = kernel(x, weights, idx, *ws, first_expert=first, out_dtype=jnp.float32,
                           layer=layer if stacked else None)
                if gathered:
                    y = jax.lax.psum_scatter(y, gathered, scatter_dimension=0, tiled=True)
                if summed:
                    y = jax.lax.psum(y, summed)
                return y.astype(x.dtype)

            # check_vma off: the kernel's loops start from zeros that are not typed as varying like the
            # weight shards; the body's reductions are explicit, and the result is tested against the loop.
            layer = jnp.zeros((), jnp.int32) if layer is None else layer
            return jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, P(), *w_specs), out_specs=tok,
                                 check_vma=False)(x, weights, idx, layer, gate, up, down)

        return run

    def local(self, fn: Callable, in_axes: Sequence[Sequence[str | None]],
              out_axes: Sequence[Sequence[str | None]]) -> Callable:
        """`fn` in shard_map, each argument and result split by its logical axes (a dimension that does
        not split evenly is left whole, as in `constrain`); see `Layout.local`."""
        mesh = self.mesh

        def fit(shape, axes, what):
            spec = list(self.rules.spec(axes, what))
            return P(*(None if e is None or n % _size(mesh, e) else e for n, e in zip(shape, spec)))

        def split_axes(specs):
            return {a for s in specs for e in s if e is not None for a in ((e,) if isinstance(e, str) else e)}

        def run(*args):
            in_specs = tuple(fit(a.shape, ax, f"argument {i} of {fn}") for i, (a, ax) in enumerate(zip(args, in_axes)))
            results, tree = jax.tree.flatten(jax.eval_shape(fn, *args))
            if len(results) != len(out_axes):
                raise ValueError(f"layout.local: {fn} returns {len(results)} arrays, out_axes names {len(out_axes)}")
            out_specs = [fit(r.shape, ax, f"result {i} of {fn}") for i, (r, ax) in enumerate(zip(results, out_axes))]
            reduced = split_axes(in_specs) - split_axes(out_specs)
            if reduced:  # each device would return a partial result that shard_map takes as the whole
                raise ValueError(f"layout.local: {fn} takes arguments split along mesh axes {sorted(reduced)} "
                                 f"that no result is split along (in {in_specs}, out {out_specs}); a per-device "
                                 "kernel cannot reduce over a split axis: map those logical axes to no mesh axis")
            # check_vma off: a Pallas call's results are not typed as varying over the mesh axes.
            return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=tree.unflatten(out_specs),
                                 check_vma=False)(*args)

        return run

    # Shardings for the engine and the planner ------------------------------------------------------
    def param_shardings(self, cfg: Config) -> dict[str, Any]:
        return param_shardings(cfg, self.mesh, self.rules)

    def cache_shardings(self, cfg: Config, batch: int, length: int) -> dict[str, Any]:
        return cache_shardings(cfg, self.mesh, self.rules, batch, length)

    def sharding(self, axes: Sequence[str | None], shape: Sequence[int] | None = None,
                 what: str = "activation") -> NamedSharding:
        """An activation's NamedSharding (divisibility checked against `shape` when given)."""
        return activation_sharding(self.mesh, self.rules, axes, shape, what)

    @property
    def batch_shards(self) -> int:
        """How many ways the batch is split (a batch must be a multiple of this)."""
        return _size(self.mesh, self.rules.mesh_axes("batch"))

    def placer(self, cfg: Config) -> Callable[[Leaf, str, tuple[int, ...], Callable], jax.Array]:
        """A `load_hf_params` placer: each device's slice is read from the checkpoint on its own.

        Devices that hold the same slice (replicas) share one host read.
        """
        mesh, rules = self.mesh, self.rules

        def place(leaf: Leaf, part: str, shape: tuple[int, ...], read: Callable) -> jax.Array:
            sharding = leaf_sharding(leaf, cfg, mesh, rules)
            if isinstance(sharding, QArray):
                sharding = sharding.values if part == "values" else sharding.scales
            host: dict[tuple, Any] = {}

            def slice_of(index: tuple[slice, ...]):
                key = tuple((s.start, s.stop, s.step) for s in index)
                if key not in host:
                    host[key] = read(index)
                return host[key]

            return jax.make_array_from_callback(shape, sharding, slice_of)

        return place


def moe_specs_axes() -> dict[str, tuple[str, ...]]:
    """Logical axes of the routed-expert weights (per layer), from their one declaration."""
    return {k: s.axes for k, s in moe_specs(KIMI_K2).items() if k.startswith("experts_")}  # axes: size-free


def _weight_spec(w, values_spec: P, mesh: Mesh):
    if isinstance(w, QArray):
        return QArray(values_spec, scale_spec(values_spec, w.shape, w.block, mesh), w.kind)
    return values_spec


def _size(mesh: Mesh, entry) -> int:
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    out = 1
    for n in names:
        out *= mesh.shape[n]
    return out
