"""Will it fit? Per-device memory of a config on a mesh, compiled from abstract weights (no weight memory).

    python -m kimi_jax.plan --config config.json --mesh data=1,expert=64,tensor=4 \\
        --batch 64 --context 32768 --hardware v5p [--rules dp_attention] [--json]

The full model is built from `jax.ShapeDtypeStruct` parameters carrying their shardings, on as many
virtual CPU devices as the mesh has (the CLI sets the count before JAX starts). Two steps are
lowered and compiled with the same shardings the engine uses:
  * prefill: a chunk of `prefill_chunk` tokens for `prefill_batch` sequences, written into a latent
    cache of `context` slots (expanded MLA), returning the last position's logits (by default
    2048 tokens reach each group of devices that shares a set of experts);
  * decode: one token for each of `batch` sequences against a latent cache of `context` tokens
    (absorbed MLA).
Per device it reports the weight bytes (fp8 values and scales, from the shardings), the decode
batch's KV-cache bytes, and the compiler's temporary bytes (`compiled.memory_analysis()`). The
temporaries come from the CPU compiler and kernels, so they only indicate what a TPU/GPU build
needs. `fits` compares weights + KV cache + the larger step's temporaries (the prefill's own cache
included) with the device memory of `--hardware`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from kimi_jax import kernels
from kimi_jax.model.backend import Backend
from kimi_jax.model.decoder import Transformer, init_cache
from kimi_jax.model.weights import abstract_params, count_params, param_bytes
from sharding import MeshLayout, describe, per_device_param_bytes
from sharding.rules import shard_bytes

GiB = 1024 ** 3
# Device memory per chip (HBM), bytes.
HARDWARE = {"v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB, "h100": 80 * GiB, "h200": 141 * GiB}
PREFILL_TOKENS = 2048  # default tokens per prefill step for each group of devices that share experts
# XLA:CPU has no bf16/fp8 arithmetic: it upcasts them, and loop-invariant code motion then hoists the
# upcast of whole layer stacks (fp8 weights -> f16, bf16 KV cache -> f32) out of the layer loop, a
# temporary of 2x the weights and cache that no TPU/GPU program has. The planner turns that pass off.
CPU_PLANNING_FLAGS = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"


@dataclasses.dataclass
class Plan:
    """The planner's answer; byte figures are per device."""

    config: str
    mesh: str
    rules: str
    batch: int
    context: int
    prefill_batch: int
    prefill_chunk: int
    total_params: int  # stored values, fp8 scales included
    total_param_bytes: int
    weights: int
    kv_cache: int
    prefill_cache: int
    temp_prefill: int
    temp_decode: int
    compiled_argument_bytes: int  # decode step's arguments per the compiler (weights + cache + tokens)
    compile_seconds: float
    backend: str  # the backend compiled (kernels.choose for the target devices)
    hardware: str | None = None
    host_peak_rss: int | None = None  # the planning process's own peak memory, bytes (Linux)

    @property
    def temp(self) -> int:
        """Peak transient bytes: the larger of the two steps (prefill's own cache counted as transient)."""
        return max(self.temp_prefill + self.prefill_cache, self.temp_decode)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.temp

    @property
    def hbm(self) -> int | None:
        return HARDWARE[self.hardware] if self.hardware else None

    @property
    def fits(self) -> bool | None:
        return None if self.hbm is None else self.total <= self.hbm

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["per_device_bytes"] = {"weights": self.weights, "kv_cache": self.kv_cache, "temp": self.temp,
                                 "total": self.total}
        if self.hardware:
            d.update(hbm_bytes=self.hbm, fits=self.fits)
        d["backend"] = self.backend
        d["note"] = f"temp is compiled for {self.backend}: indicative only unless that is the target platform"
        return d

    def text(self) -> str:
        g = lambda n: f"{n / GiB:8.2f} GiB"  # noqa: E731
        lines = [
            f"{self.config} on mesh {self.mesh} (rules '{self.rules}'), decode batch {self.batch} × context "
            f"{self.context}; prefill {self.prefill_batch} × {self.prefill_chunk} tokens; compiled for {self.backend}",
            f"total parameters   {self.total_params:,} ({self.total_param_bytes / 1e9:.1f} GB stored)",
            "per device:",
            f"  weights          {g(self.weights)}",
            f"  KV cache         {g(self.kv_cache)}",
            f"  temporaries      {g(self.temp)}   (prefill {g(self.temp_prefill)} + its cache "
            f"{g(self.prefill_cache)}; decode {g(self.temp_decode)}; compiled for {self.backend.split(':')[0]}: "
            "indicative only for another platform)",
            f"  total            {g(self.total)}",
        ]
        if self.hardware:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"{self.hardware}: {g(self.hbm)} per device -> {verdict} "
                         f"({(self.hbm - self.total) / GiB:+.2f} GiB to spare)")
        rss = f"; planner peak RSS {self.host_peak_rss / GiB:.2f} GiB" if self.host_peak_rss else ""
        lines.append(f"(compiled in {self.compile_seconds:.1f} s{rss})")
        return "\n".join(lines)


def plan(cfg, mesh, batch: int, context: int, hardware: str | None = None, rules=None,
         prefill_batch: int | None = None, prefill_chunk: int | None = None) -> Plan:
    """Compile prefill and decode for `cfg` on `mesh` from abstract weights and report per-device memory.

    Needs as many JAX devices as the mesh has: the CLI (`main`) sets up that many virtual CPU devices.
    The program is compiled with the backend of the devices it targets (`kernels.choose`: their
    expert kernel, dense products and fp8 storage).
    """
    if hardware is not None and hardware not in HARDWARE:
        raise ValueError(f"unknown hardware {hardware!r}; choose one of {', '.join(HARDWARE)}")
    if context > cfg.max_position_embeddings:
        raise ValueError(f"context {context} exceeds max_position_embeddings={cfg.max_position_embeddings}")
    layout = MeshLayout.build(mesh, rules)
    # Default prefill: the fewest sequences that split over the batch axes, sized so that each group of
    # devices sharing its experts sees PREFILL_TOKENS tokens (the MoE's buffers grow with that number).
    prefill_batch = prefill_batch or layout.batch_shards
    per_group = max(1, prefill_batch // layout.mesh.shape["data"])  # sequences each expert group sees
    chunk = min(context, prefill_chunk or max(1, PREFILL_TOKENS // per_group))

    backend = kernels.for_devices(list(layout.mesh.devices.flat))
    params = abstract_params(cfg, backend.fp8_storage)

    def compile_step(absorb: bool, b: int, t: int):
        fn, args = step_program(cfg, layout, absorb, b, t, context, backend, params)
        compiled = fn.lower(*args).compile()
        cache_bytes = sum(shard_bytes(c.shape, c.dtype, c.sharding) for c in jax.tree.leaves(args[3]))
        return compiled.memory_analysis(), cache_bytes

    start = time.perf_counter()
    prefill_mem, prefill_cache = compile_step(False, prefill_batch, chunk)
    decode_mem, kv_cache = compile_step(True, batch, 1)
    return Plan(
        config=cfg.name, mesh=describe(layout.mesh), rules=layout.rules.name, batch=batch, context=context,
        prefill_batch=prefill_batch, prefill_chunk=chunk, total_params=count_params(params),
        total_param_bytes=param_bytes(params), weights=per_device_param_bytes(cfg, layout.mesh, layout.rules),
        kv_cache=kv_cache, prefill_cache=prefill_cache, temp_prefill=int(prefill_mem.temp_size_in_bytes),
        temp_decode=int(decode_mem.temp_size_in_bytes),
        compiled_argument_bytes=int(decode_mem.argument_size_in_bytes),
        compile_seconds=time.perf_counter() - start, backend=backend.describe(), hardware=hardware,
        host_peak_rss=host_peak_rss())


def host_peak_rss() -> int | None:
    """This process's peak resident memory since exec (VmHWM), bytes; None where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def step_program(cfg, layout, absorb: bool, batch: int, tokens: int, context: int, backend: Backend,
                 params=None):
    """A jitted serving step on `layout` and abstract arguments (with shardings) to lower it with.

    step(params, tokens [B, T], positions [B, T], cache) -> (last position's logits [B, V] f32, cache);
    expanded MLA for prefill (absorb=False), absorbed for decode. The cache (`context` slots) is donated.
    """
    module = Transformer(cfg, absorb=absorb, backend=backend, dtype=jnp.bfloat16, layout=layout)

    def step(params, tokens, positions, cache):
        hidden, cache = module.apply({"params": params}, tokens, positions, cache, return_hidden=True)
        logits = jnp.einsum("bd,vd->bv", hidden[:, -1], params["lm_head"].astype(jnp.bfloat16),
                            preferred_element_type=jnp.float32)
        return layout.constrain(logits, ("batch", "vocab")), cache

    def abstract(tree, shardings):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)

    param_shardings = layout.param_shardings(cfg)  # raises on a weight that cannot split
    tok = jax.ShapeDtypeStruct((batch, tokens), jnp.int32,
                               sharding=layout.sharding(("batch", "seq"), (batch, tokens), "tokens"))
    cache_shardings = layout.cache_shardings(cfg, batch, context)
    cache = abstract(jax.eval_shape(lambda: init_cache(cfg, batch, context)), cache_shardings)
    fn = jax.jit(step, in_shardings=(param_shardings, tok.sharding, tok.sharding, cache_shardings),
                 out_shardings=(layout.sharding(("batch", "vocab")), cache_shardings), donate_argnums=(3,))
    return fn, (abstract(params or abstract_params(cfg, backend.fp8_storage), param_shardings), tok, tok, cache)


def use_cpu_devices(n: int) -> None:
    """Make JAX start with `n` virtual CPU devices; must run before JAX initialises its backend."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags.strip()} {CPU_PLANNING_FLAGS}".strip()
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)
    if len(jax.devices()) != n:
        raise RuntimeError(f"JAX was initialised with {len(jax.devices())} devices before the planner could ask for "
                           f"{n}; run the planner in a fresh process (python -m kimi_jax.plan)")
