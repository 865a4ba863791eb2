"""What the planner compiles for: a chip table, named targets, and meshes on their physical topology.

A target is `cpu` (virtual CPU devices, as many as the mesh has) or a TPU slice `v5e-N`, `v5p-N`,
`v6e-N`, where N counts chips (JAX devices). (Google Cloud names v5p slices by TensorCores, two per
chip: its `v5p-128` is our `v5p-64`, 64 chips on 16 hosts; v5e and v6e names count chips.) A TPU
target is compiled *without* a TPU: libtpu's deviceless compiler runs on this host
(`jax.experimental.topologies`), so memory and cost figures are the TPU compiler's own.
GPU targets are not compiled here: `h100` / `h200` only name the chip a CPU-compiled plan is
measured against.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator, Sequence

import jax
from jax._src import compilation_cache
from jax.experimental import topologies
from jax.sharding import AxisType

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator's memory and peak rates (per chip, dense bf16 matmul)."""

    name: str
    hbm_bytes: int
    hbm_bytes_per_s: float
    bf16_flops_per_s: float
    source: str


# Vendor figures, per chip. TPU: cloud.google.com/tpu/docs/v5e, /v5p, /v6e ("System architecture" tables).
# NVIDIA: H100 SXM and H200 SXM datasheets (dense BF16 tensor-core throughput, without sparsity).
CHIPS = {c.name: c for c in (
    Chip("v5e", 16 * GiB, 819e9, 197e12, "cloud.google.com/tpu/docs/v5e"),
    Chip("v5p", 95 * GiB, 2765e9, 459e12, "cloud.google.com/tpu/docs/v5p"),
    Chip("v6e", 32 * GiB, 1640e9, 918e12, "cloud.google.com/tpu/docs/v6e"),
    Chip("h100", 80 * GiB, 3.35e12, 989e12, "NVIDIA H100 SXM datasheet"),
    Chip("h200", 141 * GiB, 4.8e12, 989e12, "NVIDIA H200 SXM datasheet"),
)}

# Slice shapes (chips) the TPU compiler knows, per generation: 3-D tori for v5p, 2-D for v5e / v6e.
TOPOLOGIES = {
    "v5p": {8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8"},
    "v5e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    "v6e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
}


class TargetError(ValueError):
    """A target name, or a mesh on a target, that cannot be used; the message lists what can."""


@dataclasses.dataclass(frozen=True)
class Target:
    """`cpu`, or a TPU slice: its chip, chip count and topology name for the TPU compiler."""

    name: str
    chip: Chip | None = None
    chips: int = 0
    topology: str | None = None  # e.g. "v5p:4x4x4"

    @property
    def platform(self) -> str:
        return "cpu" if self.topology is None else "tpu"


@contextlib.contextmanager
def no_persistent_cache() -> Iterator[None]:
    """Compile without JAX's persistent compile cache (for deviceless TPU programs): a TPU executable
    compiled with no TPU attached cannot be loaded back from it (JAX warns at every lookup), and the
    cache is there for this host's own programs."""
    # JAX decides once per process whether the cache is used (jax._src.compilation_cache memoises it):
    # the setting alone is read only before the first compile, so the decision is reset around it.
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
        compilation_cache.reset_cache()


def known_targets() -> list[str]:
    return ["cpu"] + [f"{gen}-{n}" for gen, sizes in TOPOLOGIES.items() for n in sizes]


def parse_target(name: str) -> Target:
    """'cpu' or 'v5p-64' -> Target (an unknown name is a TargetError listing the known ones)."""
    if name == "cpu":
        return Target("cpu")
    gen, _, count = name.partition("-")
    if gen in TOPOLOGIES and count.isdigit() and int(count) in TOPOLOGIES[gen]:
        n = int(count)
        return Target(name, CHIPS[gen], n, f"{gen}:{TOPOLOGIES[gen][n]}")
    raise TargetError(f"unknown target {name!r}; known: {', '.join(known_targets())} (N counts chips)")


def target_devices(target: Target) -> list:
    """The target's devices: the TPU compiler's deviceless topology (no TPU needed)."""
    if target.topology is None:
        raise TargetError("the cpu target uses this process's devices")
    # libtpu takes a process-wide lock file; a planner compiles only, so it need not be the only user.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # deviceless: no pod to discover
    try:
        return list(topologies.get_topology_desc(topology_name=target.topology, platform="tpu").devices)
    except Exception as e:  # noqa: BLE001 - libtpu missing or too old: say how to get it
        raise TargetError(f"the TPU compiler cannot build {target.topology} ({type(e).__name__}: {e}); install it "
                          "with `pip install -e '.[tpu]'` (jax[tpu] at this JAX's version)") from None


def topology_mesh(sizes: dict[str, int], devices: Sequence, axes: Sequence[str]):
    """A Mesh of `sizes` (axis -> size) on TPU `devices`, each mesh axis on whole physical axes.

    `jax.make_mesh` maps logical axes onto the torus; a shape it cannot map is a TargetError that
    lists the (data, expert, tensor) shapes of this device count that do map.
    """
    shape = tuple(sizes[a] for a in axes)
    try:
        return jax.make_mesh(shape, tuple(axes), devices=list(devices), axis_types=(AxisType.Auto,) * len(axes))
    except (ValueError, AssertionError, NotImplementedError) as e:
        fits = [s for s in mesh_shapes(len(devices)) if mappable(s, devices, axes)]
        shown = "; ".join(",".join(f"{a}={n}" for a, n in zip(axes, s)) for s in fits[:12])
        raise TargetError(f"mesh {','.join(f'{a}={n}' for a, n in zip(axes, shape))} does not map onto the "
                          f"{len(devices)} chips' physical axes ({e}); shapes that do: {shown}") from None


def mesh_shapes(n: int) -> list[tuple[int, int, int]]:
    """Every (data, expert, tensor) with data · expert · tensor = n."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return [(d, e, n // (d * e)) for d in divisors for e in divisors if (n // d) % e == 0]


def mappable(shape: tuple[int, ...], devices: Sequence, axes: Sequence[str]) -> bool:
    """Whether `jax.make_mesh` maps `shape` onto the devices' physical axes."""
    try:
        jax.make_mesh(shape, tuple(axes), devices=list(devices), axis_types=(AxisType.Auto,) * len(axes))
        return True
    except (ValueError, AssertionError, NotImplementedError):
        return False


def chip_count(sizes: dict[str, int]) -> int:
    return math.prod(sizes.values())
