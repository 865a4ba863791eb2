"""Will it fit, and how close to the memory roofline does a step run? Compiled from abstract weights.

    python -m kimi_jax.plan --config config.json --target v5p-64 --mesh data=1,expert=16,tensor=4 \\
        --batch 64 --context 8192 [--rules dp_attention] [--json]

The full model is built from `jax.ShapeDtypeStruct` parameters carrying their shardings (no weight
memory) on the target's devices: for a TPU target (`targets.py`) the TPU compiler's deviceless
topology, the mesh laid on its physical axes; for `cpu` as many virtual CPU devices as the mesh has
(the CLI sets the count before JAX starts). The engine's backend for that platform is compiled
(`kernels.choose`). Two steps are lowered and compiled with the shardings the engine uses:
  * prefill: a chunk of `prefill_chunk` tokens for `prefill_batch` sequences, written into a latent
    cache of `context` slots (expanded MLA), returning the last position's logits (by default
    2048 tokens reach each group of devices that shares a set of experts);
  * decode: one token for each of `batch` sequences against a latent cache of `context` tokens
    (absorbed MLA).
Per device: weight bytes (from the shardings), the decode batch's KV-cache bytes and the compiler's
temporaries (`memory_analysis()`; real for a TPU target, indicative when a CPU compile stands in for
a GPU), and whether they fit the chip's HBM.

Cost per step (`cost_analysis()`) is accounted for the layer loops: XLA counts a while-loop body once,
whatever its trip count, so a program with scanned layers reports the outside (embedding, lm_head),
one dense and one MoE layer, and, once per layer of each stack, what the loop's stacks cost outside
it. Programs of the same step without each kind of layer, and with one layer fewer, separate these
(`step_cost`), and every layer is counted. That is set against what the step must
read (`must_read.py`): the ratio, the roofline time (must-read bytes / HBM bandwidth) and the tokens/s
ceiling it implies; prefill flops against the chip's peak.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from kimi_jax import kernels
from kimi_jax.config import Config
from kimi_jax.model.backend import Backend
from kimi_jax.model.decoder import Transformer, init_cache
from kimi_jax.model.weights import abstract_params, count_params, param_bytes
from kimi_jax.runtime.must_read import decode_must_read
from kimi_jax.runtime.targets import CHIPS, Target, no_persistent_cache, parse_target, target_devices, topology_mesh
from sharding import AXES, MeshLayout, describe, parse_mesh_spec, per_device_param_bytes
from sharding.rules import get_rules, shard_bytes

GiB = 1024 ** 3
HARDWARE = {name: chip.hbm_bytes for name, chip in CHIPS.items()}  # HBM per chip, bytes
PREFILL_TOKENS = 2048  # default tokens per prefill step for each group of devices that share experts
# XLA:CPU has no bf16/fp8 arithmetic: it upcasts them, and loop-invariant code motion then hoists the
# upcast of whole layer stacks (fp8 weights -> f16, bf16 KV cache -> f32) out of the layer loop, a
# temporary of 2x the weights and cache that no TPU/GPU program has. The planner turns that pass off.
CPU_PLANNING_FLAGS = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"


@dataclasses.dataclass
class StepCost:
    """XLA's cost of one step program, whole model: bytes accessed and flops, loops accounted for."""

    bytes_accessed: float
    flops: float
    per_moe_layer_bytes: float | None  # one MoE layer, L + s (`step_cost`)
    per_moe_layer_flops: float | None
    raw: dict[str, float]  # cost_analysis() of the full-depth program as compiled (loop bodies once)
    per_moe_layer_outside_bytes: float | None = None  # s of `step_cost`: outside the loop


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
    target: str = "cpu"
    hardware: str | None = None
    host_peak_rss: int | None = None  # the planning process's own peak memory, bytes (Linux)
    decode_cost: StepCost | None = None
    prefill_cost: StepCost | None = None
    must_read: Any = None  # must_read.MustRead of the decode step
    kv_pool: int | None = None  # a paged KV pool's bytes per device (serve --kv-pages); None: batch × context
    page_size: int = 64  # positions per page of that pool

    @property
    def temp(self) -> int:
        """Peak transient bytes: the larger of the two steps (prefill's own cache counted as transient)."""
        return max(self.temp_prefill + self.prefill_cache, self.temp_decode)

    @property
    def total(self) -> int:
        """Per device: weights, the KV cache (the paged pool when given) and the larger step's temporaries."""
        return self.weights + (self.kv_cache if self.kv_pool is None else self.kv_pool) + self.temp

    @property
    def chip(self):
        return CHIPS[self.hardware] if self.hardware else None

    @property
    def hbm(self) -> int | None:
        return self.chip.hbm_bytes if self.chip else None

    @property
    def fits(self) -> bool | None:
        return None if self.hbm is None else self.total <= self.hbm

    def pool_figures(self) -> dict[str, int] | None:
        """What a paged KV pool holds: the given pool, else what the chip's HBM leaves after the weights
        and temporaries. A token of a sequence costs each device kv_cache ÷ (batch × context) (a device
        holds its batch shard's rows), so `sequences` counts the whole mesh's sequences of `context`
        tokens."""
        pool = self.kv_pool if self.kv_pool is not None else (
            self.hbm - self.weights - self.temp if self.hbm is not None else None)
        if pool is None:
            return None
        per_page = self.kv_cache / (self.batch * self.context) * self.page_size
        pages = max(0, int(pool // per_page))
        tokens = pages * self.page_size
        return {"bytes": int(pool), "page_size": self.page_size, "pages": pages, "tokens": tokens,
                "sequences": tokens // self.context}

    def decode_figures(self) -> dict[str, float] | None:
        """bytes accessed per step vs must-read, the roofline time and the tokens/s ceiling (per chip)."""
        if self.decode_cost is None or self.must_read is None:
            return None
        must = self.must_read.total
        out = {"bytes_accessed": self.decode_cost.bytes_accessed, "must_read_bytes": must,
               "ratio": self.decode_cost.bytes_accessed / must, "flops": self.decode_cost.flops}
        if self.decode_cost.per_moe_layer_bytes is not None and self.must_read.per_moe_layer:
            out.update(moe_layer_bytes_accessed=self.decode_cost.per_moe_layer_bytes,
                       moe_layer_outside_loop_bytes=self.decode_cost.per_moe_layer_outside_bytes,
                       moe_layer_must_read_bytes=self.must_read.per_moe_layer,
                       moe_layer_ratio=self.decode_cost.per_moe_layer_bytes / self.must_read.per_moe_layer)
        if self.chip is not None:
            roofline_s = must / self.chip.hbm_bytes_per_s
            out.update(roofline_ms=roofline_s * 1e3, tokens_per_s_ceiling=self.batch / roofline_s)
        return out

    def prefill_figures(self) -> dict[str, float] | None:
        if self.prefill_cost is None:
            return None
        out = {"flops": self.prefill_cost.flops, "bytes_accessed": self.prefill_cost.bytes_accessed,
               "tokens": self.prefill_batch * self.prefill_chunk}
        if self.chip is not None:
            out["flops_bound_ms"] = self.prefill_cost.flops / self.chip.bf16_flops_per_s * 1e3
        return out

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("decode_cost", "prefill_cost", "must_read")}
        d["per_device_bytes"] = {"weights": self.weights, "kv_cache": self.kv_cache, "temp": self.temp,
                                 "total": self.total}
        if self.hardware:
            d.update(hbm_bytes=self.hbm, fits=self.fits)
        if self.pool_figures() is not None:
            d["kv_pool"] = self.pool_figures()
        if self.decode_cost is not None:
            d["xla_cost"] = {"decode": self.decode_cost.raw, "prefill": self.prefill_cost.raw}
            d["decode"] = self.decode_figures()
            d["prefill"] = self.prefill_figures()
            d["must_read"] = dataclasses.asdict(self.must_read) | {"total": self.must_read.total}
        d["note"] = (f"compiled for {self.target} ({self.backend})" + ("" if self.target != "cpu" else
                     "; CPU temporaries and costs are indicative only for another platform"))
        return d

    def text(self) -> str:
        g = lambda n: f"{n / GiB:8.2f} GiB"  # noqa: E731
        lines = [
            f"{self.config} on {self.target} mesh {self.mesh} (rules '{self.rules}'), decode batch {self.batch} × "
            f"context {self.context}; prefill {self.prefill_batch} × {self.prefill_chunk} tokens",
            f"compiled for {self.backend}",
            f"total parameters   {self.total_params:,} ({self.total_param_bytes / 1e9:.1f} GB stored)",
            "per device:",
            f"  weights          {g(self.weights)}",
            f"  KV cache         {g(self.kv_cache)}",
            f"  temporaries      {g(self.temp)}   (prefill {g(self.temp_prefill)} + its cache "
            f"{g(self.prefill_cache)}; decode {g(self.temp_decode)}"
            + ("; CPU-compiled: indicative only for another platform)" if self.target == "cpu" else ")"),
            f"  total            {g(self.total)}",
        ]
        if self.hardware:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"{self.hardware}: {g(self.hbm)} per device -> {verdict} "
                         f"({(self.hbm - self.total) / GiB:+.2f} GiB to spare)")
        pool = self.pool_figures()
        if pool:
            what = "given" if self.kv_pool is not None else "what the HBM leaves"
            lines.append(f"paged KV pool ({what}): {g(pool['bytes'])} per device = {pool['pages']:,} pages of "
                         f"{pool['page_size']} -> {pool['tokens']:,} tokens = {pool['sequences']:,} sequences of "
                         f"{self.context} tokens at once")
        dec = self.decode_figures()
        if dec:
            lines.append(f"decode step: {dec['bytes_accessed'] / 1e9:.3f} GB accessed per device, must read "
                         f"{dec['must_read_bytes'] / 1e9:.3f} GB (ratio {dec['ratio']:.2f})")
            if "moe_layer_ratio" in dec:
                lines.append(f"  one MoE layer: {dec['moe_layer_bytes_accessed'] / 1e6:.1f} MB accessed, must read "
                             f"{dec['moe_layer_must_read_bytes'] / 1e6:.1f} MB (ratio {dec['moe_layer_ratio']:.2f})")
            if "roofline_ms" in dec:
                lines.append(f"  roofline {dec['roofline_ms']:.3f} ms per step -> at most "
                             f"{dec['tokens_per_s_ceiling']:,.0f} tokens/s per replica")
        pre = self.prefill_figures()
        if pre and "flops_bound_ms" in pre:
            lines.append(f"prefill step: {pre['flops'] / 1e12:.2f} TFLOP per device -> {pre['flops_bound_ms']:.1f} ms "
                         "at the chip's bf16 peak")
        rss = f"; planner peak RSS {self.host_peak_rss / GiB:.2f} GiB" if self.host_peak_rss else ""
        lines.append(f"(compiled in {self.compile_seconds:.1f} s{rss})")
        return "\n".join(lines)


def plan_layout(mesh, rules, target: Target) -> MeshLayout:
    """The mesh on the target's devices: this process's (cpu) or the TPU topology's, physical-axis aware."""
    if target.topology is None:
        return MeshLayout.build(mesh, rules)
    devices = target_devices(target)
    sizes = parse_mesh_spec(mesh)
    if len(devices) != prod(sizes.values()):
        raise ValueError(f"mesh {','.join(f'{a}={n}' for a, n in sizes.items())} has {prod(sizes.values())} "
                         f"devices; {target.name} has {len(devices)} chips")
    return MeshLayout(topology_mesh(sizes, devices, AXES), get_rules(rules))


def prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def plan(cfg: Config, mesh, batch: int, context: int, hardware: str | None = None, rules=None,
         prefill_batch: int | None = None, prefill_chunk: int | None = None, target: str = "cpu",
         cost: bool = True, kv_pool: int | None = None, page_size: int = 64) -> Plan:
    """Compile prefill and decode for `cfg` on `mesh` from abstract weights and report per-device memory
    and (with `cost`) the loop-accounted cost of each step against what it must read.

    target: "cpu" (this process's devices: the CLI sets up as many virtual CPU devices as the mesh has)
    or a TPU slice such as "v5p-64" (`targets.py`; its chip is the default `hardware`).
    """
    tgt = parse_target(target)
    hardware = hardware or (tgt.chip.name if tgt.chip else None)
    if hardware is not None and hardware not in HARDWARE:
        raise ValueError(f"unknown hardware {hardware!r}; choose one of {', '.join(HARDWARE)}")
    if context > cfg.max_position_embeddings:
        raise ValueError(f"context {context} exceeds max_position_embeddings={cfg.max_position_embeddings}")
    layout = plan_layout(mesh, rules, tgt)
    # Default prefill: the fewest sequences that split over the batch axes, sized so that each group of
    # devices sharing its experts sees PREFILL_TOKENS tokens (the MoE's buffers grow with that number).
    prefill_batch = prefill_batch or layout.batch_shards
    per_group = max(1, prefill_batch // layout.mesh.shape["data"])  # sequences each expert group sees
    chunk = min(context, prefill_chunk or max(1, PREFILL_TOKENS // per_group))

    backend = kernels.for_devices(list(layout.mesh.devices.flat))
    params = abstract_params(cfg, backend.fp8_storage)

    def compile_step(c: Config, absorb: bool, b: int, t: int, unroll: bool = False):
        fn, args = step_program(c, layout, absorb, b, t, context, backend, unroll=unroll)
        with no_persistent_cache() if tgt.platform == "tpu" else contextlib.nullcontext():
            compiled = fn.lower(*args).compile()
        cache_bytes = sum(shard_bytes(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(args[3]))
        return compiled, cache_bytes

    start = time.perf_counter()
    prefill, prefill_cache = compile_step(cfg, False, prefill_batch, chunk)
    decode, kv_cache = compile_step(cfg, True, batch, 1)
    costs = {}
    if cost:
        for absorb, b, t, full in ((True, batch, 1, decode), (False, prefill_batch, chunk, prefill)):
            costs[absorb] = step_cost(cfg, full, lambda c, u, a=absorb, b=b, t=t: compile_step(c, a, b, t, u)[0])
    prefill_mem, decode_mem = prefill.memory_analysis(), decode.memory_analysis()
    return Plan(
        config=cfg.name, mesh=describe(layout.mesh), rules=layout.rules.name, batch=batch, context=context,
        prefill_batch=prefill_batch, prefill_chunk=chunk, total_params=count_params(params),
        total_param_bytes=param_bytes(params), weights=per_device_param_bytes(cfg, layout.mesh, layout.rules),
        kv_cache=kv_cache, prefill_cache=prefill_cache, temp_prefill=int(prefill_mem.temp_size_in_bytes),
        temp_decode=int(decode_mem.temp_size_in_bytes),
        compiled_argument_bytes=int(decode_mem.argument_size_in_bytes),
        compile_seconds=time.perf_counter() - start, backend=backend.describe(), target=tgt.name,
        hardware=hardware, host_peak_rss=host_peak_rss(), decode_cost=costs.get(True),
        prefill_cost=costs.get(False),
        must_read=decode_must_read(cfg, layout.mesh, layout.rules, batch, context, backend.fp8_storage)
        if cost else None, kv_pool=kv_pool, page_size=page_size)


def cost_of(compiled) -> dict[str, float]:
    """`cost_analysis()` of a compiled program as a plain dict of its totals."""
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, list) else c
    return {k: float(v) for k, v in c.items() if k in ("bytes accessed", "flops", "transcendentals")}


def step_cost(cfg: Config, full, compile_variant) -> StepCost:
    """The step's cost with every layer counted (module docstring).

    `compile_variant(config, unroll)` compiles the same step for a config of other depth. Each kind of
    layer (group g of n_g layers) runs in a loop, a group of one inlined. The compiled program counts
    the loop body L_g once, and n_g times s_g: what grows with the group's stacks outside the loop
    (e.g. a layout copy of a cache stack before and after the loop, per layer of the stack), so

        C(n_dense, n_moe) = O + Σ_g (L_g + n_g·s_g).

    With both kinds, the program without group g gives L_g + n_g·s_g, and with one layer fewer
    (n_g ≥ 3, still a loop) s_g; for n_g = 2, s_g is taken as 0 (counted twice, not n_g² times), and
    so is a negative s_g (the compiler placed a shallower stack differently: seen at 8 vs 7 layers).
    With one kind only (a model needs a layer), inlined programs of one and two layers give O + L and
    O + 2L, whence n·s. The step costs C + Σ_g (n_g − 1)·L_g; one layer of group g, L_g + s_g.
    """
    raw = cost_of(full)
    n_dense, n_moe = cfg.num_dense_layers, cfg.num_moe_layers
    keys = ("bytes accessed", "flops")

    def depth(dense: int, moe: int, unroll: bool = False) -> dict[str, float]:
        c = dataclasses.replace(cfg, num_hidden_layers=dense + moe, first_k_dense_replace=dense)
        return cost_of(compile_variant(c, unroll))

    def minus(a, b, times=1.0):
        return {k: a[k] - times * b[k] for k in keys}

    zero = dict.fromkeys(keys, 0.0)
    body, per_layer, outside = {}, {}, {}  # L_g, L_g + s_g and s_g per group present
    if n_dense and n_moe:
        for group, n in (("dense", n_dense), ("moe", n_moe)):
            without = depth(0, n_moe) if group == "dense" else depth(n_dense, 0)
            grown = zero
            if n >= 3:  # negative when the compiler chose differently for the shallower stack: taken as 0
                fewer = depth(n_dense - 1, n_moe) if group == "dense" else depth(n_dense, n_moe - 1)
                grown = {k: max(0.0, v) for k, v in minus(raw, fewer).items()}
            body[group] = minus(minus(raw, without), grown, n)
            per_layer[group], outside[group] = {k: body[group][k] + grown[k] for k in keys}, grown
    else:
        group, n = ("dense", n_dense) if n_dense else ("moe", n_moe)
        one = raw if n == 1 else depth(n_dense and 1, n_moe and 1, unroll=True)
        body[group] = minus(depth(n_dense and 2, n_moe and 2, unroll=True), one)
        grown = {k: (raw[k] - one[k]) / n for k in keys}
        per_layer[group], outside[group] = {k: body[group][k] + grown[k] for k in keys}, grown
    counts = {"dense": n_dense, "moe": n_moe}
    totals = {k: raw[k] + sum((counts[g] - 1) * body[g][k] for g in body if counts[g] > 1) for k in keys}
    moe, moe_outside = per_layer.get("moe"), outside.get("moe")
    return StepCost(totals["bytes accessed"], totals["flops"], moe and moe["bytes accessed"], moe and moe["flops"], raw,
                    moe_outside and moe_outside["bytes accessed"])


def host_peak_rss() -> int | None:
    """This process's peak resident memory since exec (VmHWM), bytes; None where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def step_program(cfg, layout, absorb: bool, batch: int, tokens: int, context: int, backend: Backend,
                 params=None, unroll: bool = False):
    """A jitted serving step on `layout` and abstract arguments (with shardings) to lower it with.

    step(params, tokens [B, T], positions [B, T], cache) -> (last position's logits [B, V] f32, cache);
    expanded MLA for prefill (absorb=False), absorbed for decode. The cache (`context` slots) is donated.
    `unroll` inlines the layers instead of looping over them (cost accounting, see `step_cost`).
    """
    module = Transformer(cfg, absorb=absorb, backend=backend, dtype=jnp.bfloat16, layout=layout, unroll=unroll)

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


def use_cpu_devices(n: int, cpu_target: bool = True) -> None:
    """Make JAX start with `n` virtual CPU devices; must run before JAX initialises its backend.

    With `cpu_target` the CPU compiler is the one planned with, and gets CPU_PLANNING_FLAGS (XLA_FLAGS
    reach every compiler, so a TPU target's plan must not set them).
    """
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags.strip()} {CPU_PLANNING_FLAGS if cpu_target else ''}".strip()
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)
    if len(jax.devices()) != n:
        raise RuntimeError(f"JAX was initialised with {len(jax.devices())} devices before the planner could ask for "
                           f"{n}; run the planner in a fresh process (python -m kimi_jax.plan)")
