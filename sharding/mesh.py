"""The device mesh: three named axes, `data`, `expert` and `tensor`, built from a short spec.

    make_mesh("data=1,expert=4,tensor=2")   # a string; a missing axis is 1
    make_mesh({"expert": 8})                 # a dict
    make_mesh(existing_mesh)                 # a jax.sharding.Mesh with these axis names, as is

Axes are `AxisType.Auto`: outside the routed experts the compiler (GSPMD) partitions the program
from the parameter shardings and a few activation constraints; `jax.make_mesh` would default to
Explicit axes, which type every array's sharding and need code written for them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh

AXES = ("data", "expert", "tensor")
MeshSpec = str | Mapping[str, int] | Mesh


class MeshError(ValueError):
    """A mesh that cannot be built or does not fit the model: the axis, its size and the fix are named."""


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """"data=2,expert=4" or {"data": 2, "expert": 4} -> {"data": 2, "expert": 4, "tensor": 1}."""
    if isinstance(spec, str):
        sizes = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            m = re.fullmatch(r"(\w+)\s*=\s*(\d+)", part)
            if not m:
                raise MeshError(f"mesh spec part {part!r} is not NAME=SIZE; write e.g. 'data=1,expert=4,tensor=2'")
            if m.group(1) in sizes:
                raise MeshError(f"mesh spec {spec!r} names axis '{m.group(1)}' twice")
            sizes[m.group(1)] = int(m.group(2))
    else:
        sizes = dict(spec)
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise MeshError(f"unknown mesh axis {unknown}; the axes are {', '.join(AXES)}")
    for name, size in sizes.items():
        if not isinstance(size, int) or size < 1:
            raise MeshError(f"mesh axis '{name}' has size {size!r}; sizes are positive integers")
    return {a: sizes.get(a, 1) for a in AXES}


def mesh_size(spec: MeshSpec) -> int:
    """How many devices a mesh spec needs (no JAX backend is touched)."""
    if isinstance(spec, Mesh):
        return spec.size
    return math.prod(parse_mesh_spec(spec).values())


def make_mesh(spec: MeshSpec, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` over axes (data, expert, tensor) using all `devices` (default: jax.devices())."""
    if isinstance(spec, Mesh):
        if tuple(spec.axis_names) != AXES:
            raise MeshError(f"mesh axes are {tuple(spec.axis_names)}; kimi_jax needs exactly {AXES} "
                            "(build one with sharding.make_mesh)")
        return spec
    sizes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(sizes.values())
    if need != len(devices):
        shown = ",".join(f"{a}={s}" for a, s in sizes.items())
        raise MeshError(f"mesh {shown} needs {need} devices but {len(devices)} are available; the sizes must "
                        f"multiply to the device count ({len(devices)})")
    return jax.make_mesh(tuple(sizes.values()), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def abstract_mesh(spec: MeshSpec) -> AbstractMesh:
    """The mesh's axis sizes without devices: enough to check that a model splits over it."""
    if isinstance(spec, Mesh):
        return spec.abstract_mesh
    sizes = parse_mesh_spec(spec)
    return AbstractMesh(tuple(sizes.values()), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def describe(mesh: Mesh | AbstractMesh) -> str:
    """'data=1,expert=4,tensor=2' for a mesh."""
    return ",".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)
