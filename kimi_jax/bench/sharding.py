"""Measurements behind sharding/DESIGN.md (run by scripts/bench_sharding.py on 8 fake CPU devices).

* `model`: full forward (prefill-like) and one decode step of a mid-size model, expert-parallel
  versus replicated experts, medians of interleaved runs;
* `moe`: one MoE layer's routed experts under three strategies, including `all_to_all_experts`,
  the alternative this package does *not* use, kept here only so the choice stays measurable;
* `planner`: the planner CLI in a child process (wall time, peak RSS, per-device figures).

On fake CPU devices every "device" shares the same cores and collectives are memory copies, so the
figures compare work done, not interconnect cost: an indication only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kimi_jax import kernels
from kimi_jax.config import TINY_KIMI
from kimi_jax.model.decoder import init_cache
from kimi_jax.model.moe import route
from kimi_jax.model.quant import to_storage
from kimi_jax.model.weights import random_params
from kimi_jax.runtime.plan import step_program
from sharding.layout import MeshLayout
from sharding.rules import DP_ATTENTION_RULES, RULES, param_shardings

# Mid-size: big enough that expert matmuls dominate, small enough for a 2-core machine.
BENCH = dataclasses.replace(
    TINY_KIMI, vocab_size=4096, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
    num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=192, kv_lora_rank=128,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=64, num_experts_per_tok=8,
    name="bench-mid")

# (label, mesh, rules): the same 8 devices; only where experts live and how tokens reach them differ.
MODEL_LAYOUTS = [
    ("EP, tokens replicated, psum (default rules)", "expert=8", "default"),
    ("EP, batch split over expert, gather + psum_scatter (dp_attention)", "expert=8", "dp_attention"),
    ("replicated experts, batch split over data (pure data parallel)", "data=8", "default"),
]


def median_ms(fns: dict[str, callable], runs: int) -> dict[str, float]:
    """Interleaved timing: each round runs every fn once (blocking), medians per fn in ms."""
    times = {k: [] for k in fns}
    for f in fns.values():  # warm up / compile
        jax.block_until_ready(f())
    for _ in range(runs):
        for k, f in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(f())  # block every call: queued collectives can deadlock on CPU
            times[k].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_model(runs: int, batch: int = 8, prompt: int = 64, context: int = 256) -> list[dict]:
    """Forward of batch × prompt tokens and a decode step (batch × 1 token, `context`-slot cache)."""
    backend = kernels.for_devices(jax.devices())  # the 8 devices every layout spans
    host = jax.tree.map(lambda a: to_storage(a, backend.fp8_storage), random_params(BENCH, seed=0, std=0.05))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, BENCH.vocab_size, (batch, prompt)).astype(np.int32)
    positions = np.broadcast_to(np.arange(prompt, dtype=np.int32), (batch, prompt))
    step_tok = tokens[:, :1]
    step_pos = np.full((batch, 1), context - 1, np.int32)
    fns, rows = {}, []
    for label, mesh, rules in MODEL_LAYOUTS:
        layout = MeshLayout.build(mesh, rules)
        params = jax.device_put(host, layout.param_shardings(BENCH))
        prefill, _ = step_program(BENCH, layout, False, batch, prompt, prompt, backend)
        decode, _ = step_program(BENCH, layout, True, batch, 1, context, backend)
        caches = {"prefill": init_cache(BENCH, batch, prompt), "decode": init_cache(BENCH, batch, context)}
        # The cache argument is donated: each call gets a fresh copy (outside the timed call is not
        # possible through the dict, so a copy is part of every run for every layout alike).
        fns[(label, "forward")] = lambda f=prefill, p=params, c=caches: f(p, tokens, positions,
                                                                        jax.tree.map(jnp.copy, c["prefill"]))
        fns[(label, "decode")] = lambda f=decode, p=params, c=caches: f(p, step_tok, step_pos,
                                                                       jax.tree.map(jnp.copy, c["decode"]))
    result = median_ms(fns, runs)
    for label, mesh, rules in MODEL_LAYOUTS:
        rows.append({"layout": label, "mesh": mesh, "rules": rules, "forward_ms": result[(label, "forward")],
                     "decode_ms": result[(label, "decode")]})
    return rows


# One MoE layer --------------------------------------------------------------------------------
def all_to_all_experts(mesh, kernel):
    """The alternative not taken: tokens split over `expert`, each (token, expert) row sent to the
    device holding its expert with `all_to_all`, and the results sent back.

    No token may be dropped, so every destination slot is sized for the worst case (all of a
    device's rows to one device): the receive buffer holds ex × n·k rows, the same number of rows
    the psum strategy computes, and each row crosses the interconnect twice, k times per token.
    """
    ex = mesh.shape["expert"]
    w_spec = P("expert")

    def body(x, weights, idx, gate, up, down):
        n, k = idx.shape
        d = x.shape[-1]
        e_local = gate.shape[0]
        dest = (idx // e_local).reshape(-1)  # (n·k,) device holding each assignment's expert
        onehot = jax.nn.one_hot(dest, ex, dtype=jnp.int32)
        pos = ((jnp.cumsum(onehot, 0) - onehot) * onehot).sum(-1)  # rank among rows bound for that device
        cap = n * k  # worst case: every row to one device
        send = jnp.zeros((ex, cap, d), x.dtype).at[dest, pos].set(jnp.repeat(x, k, axis=0))
        send_ids = jnp.full((ex, cap), -1, jnp.int32).at[dest, pos].set(idx.reshape(-1))
        recv = jax.lax.all_to_all(send, "expert", 0, 0)  # (ex, cap, D): rows from every device
        recv_ids = jax.lax.all_to_all(send_ids, "expert", 0, 0).reshape(-1, 1)  # −1: empty slot
        first = jax.lax.axis_index("expert") * e_local
        y = kernel(recv.reshape(-1, d), jnp.ones(recv_ids.shape, jnp.float32), recv_ids, gate, up, down,
                   first_expert=first, out_dtype=jnp.float32)
        back = jax.lax.all_to_all(y.reshape(ex, cap, d), "expert", 0, 0)  # results to their senders
        rows = back[dest, pos].reshape(n, k, d)
        return jnp.einsum("nkd,nk->nd", rows, weights).astype(x.dtype)

    def run(x, weights, idx, gate, up, down):
        specs = jax.tree.map(lambda _: w_spec, (gate, up, down))
        return jax.shard_map(body, mesh=mesh, in_specs=(P("expert"),) * 3 + specs, out_specs=P("expert"),
                             check_vma=False)(x, weights, idx, gate, up, down)

    return run


def replicated_experts(mesh, kernel):
    """Every device holds every expert and runs its own slice of the tokens (pure data parallel)."""
    def run(x, weights, idx, gate, up, down):
        body = lambda x, w, i, g, u, d: kernel(x, w, i, g, u, d)  # noqa: E731
        specs = jax.tree.map(lambda _: P(), (gate, up, down))
        return jax.shard_map(body, mesh=mesh, in_specs=(P("expert"),) * 3 + specs, out_specs=P("expert"),
                             check_vma=False)(x, weights, idx, gate, up, down)

    return run


def bench_moe(runs: int, token_counts=(64, 1024)) -> list[dict]:
    """Routed experts of one BENCH layer, tokens split over expert=8, for each strategy, with the
    devices' expert kernel."""
    backend = kernels.for_devices(jax.devices())
    kernel = backend.experts
    p = random_params(BENCH, seed=1, std=0.05)["moe_layers"]["ffn"]
    layer = {k: jax.tree.map(lambda a: a[0], p[k]) for k in p}
    layer = jax.tree.map(lambda a: to_storage(a, backend.fp8_storage), layer)
    layout = MeshLayout.build("expert=8", DP_ATTENTION_RULES)
    mesh = layout.mesh
    shard = param_shardings(BENCH, mesh, RULES)["moe_layers"]["ffn"]
    per_layer = lambda s: NamedSharding(mesh, P(*s.spec[1:]))  # noqa: E731  (drop the layers axis)
    names = ("experts_gate", "experts_up", "experts_down")
    ep_weights = [jax.device_put(layer[k], jax.tree.map(per_layer, shard[k])) for k in names]
    full_weights = [jax.device_put(layer[k], NamedSharding(mesh, P())) for k in names]
    strategies = {
        "psum (gather tokens, local experts, psum_scatter)": (layout.experts(kernel), ep_weights),
        "all_to_all (rows to their expert's device, worst-case slots)": (all_to_all_experts(mesh, kernel),
                                                                          ep_weights),
        "replicated experts (data parallel)": (replicated_experts(mesh, kernel), full_weights),
    }
    rows = []
    for n in token_counts:
        x = jax.device_put(jnp.asarray(np.random.default_rng(n).standard_normal((n, BENCH.hidden_size)),
                                       jnp.bfloat16), NamedSharding(mesh, P("expert")))
        weights, idx = jax.jit(lambda x: route(x, jnp.asarray(layer["router"]), jnp.asarray(layer["router_bias"]),
                                               BENCH))(x)
        fns = {}
        for name, (fn, ws) in strategies.items():
            f = jax.jit(fn)
            fns[name] = lambda f=f, ws=ws, args=(x, weights, idx): f(*args, *ws)
        outs = {k: np.asarray(f(), np.float32) for k, f in fns.items()}
        ref = outs[next(iter(outs))]
        times = median_ms(fns, runs)
        for k in fns:
            err = float(np.linalg.norm(outs[k] - ref) / np.linalg.norm(ref))
            rows.append({"tokens": n, "strategy": k, "ms": times[k], "rel_diff_vs_psum": err})
    return rows


# The planner ----------------------------------------------------------------------------------
def run_planner(args: list[str]) -> tuple[dict, float]:
    """`python -m kimi_jax.plan ARGS --json` in a child process -> (report, wall seconds).

    The report carries the child's own peak RSS (`host_peak_rss`, from /proc VmHWM: rusage would
    count the parent's memory too, since the child is forked from it before exec).
    """
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the planner sets its own device count
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "kimi_jax.plan", *args, "--json"], capture_output=True, text=True,
                         env=env)
    wall = time.perf_counter() - start
    if out.returncode:
        raise RuntimeError(f"planner {' '.join(args)} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout), wall
