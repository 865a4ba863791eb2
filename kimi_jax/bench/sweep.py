"""Decode step time across routed-expert counts and batch sizes on CPU: does time follow the bytes?

Each point is one decode step of a random-weights model at the bench width (hidden 1024, 6 layers,
moe_intermediate 256) with E routed experts, at batch B over a short context: the median seconds per
step, the bytes the step must read (`roofline.decode_step_bytes`: dense weights, the experts the
batch is expected to hit, the cache rows) and the bandwidth that implies. A cliff is a point whose
GB/s drops well below its neighbours': the step reads no more but takes longer.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics

import jax
import numpy as np

from kimi_jax import kernels
from kimi_jax.bench import roofline
from kimi_jax.bench.compare import BENCH
from kimi_jax.bench.timing import timed_stream
from kimi_jax.config import Config
from kimi_jax.model.quant import to_storage
from kimi_jax.model.weights import random_params
from kimi_jax.runtime.engine import Model
from kimi_jax.runtime.requests import make_requests

EXPERTS = (16, 64, 128, 384)
BATCHES = (1, 2, 4, 8, 16, 32, 64)


def sweep_config(experts: int) -> Config:
    return dataclasses.replace(BENCH, name=f"bench-{experts}", n_routed_experts=experts,
                               num_experts_per_tok=min(8, experts))


def point(model: Model, batch: int, prompt: int, steps: int, reps: int) -> float:
    """Median seconds per decode step (greedy, `steps` steps after a `prompt`-token prefill)."""
    rng = np.random.default_rng(batch)
    prompts = [list(rng.integers(0, model.config.vocab_size, prompt)) for _ in range(batch)]
    requests = make_requests(model.config, prompts, steps + 1, temperature=0.0, stop_token_ids=[])
    timed_stream(model.generator, requests)  # compiles this batch's buckets
    times = []
    for _ in range(reps):
        _, seconds, tokens = timed_stream(model.generator, requests)
        times.append(seconds / (tokens / batch))
    return statistics.median(times)


def run(experts=EXPERTS, batches=BATCHES, prompt: int = 16, steps: int = 16, reps: int = 3, log=print) -> list[dict]:
    rows = []
    for e in experts:
        cfg = sweep_config(e)
        storage = kernels.for_devices().fp8_storage  # as a checkpoint loader holds fp8 (uint8 on CPU)
        params = jax.tree.map(functools.partial(to_storage, storage=storage), random_params(cfg, seed=0, std=0.05))
        model = Model(cfg, params, dtype="bfloat16")
        for b in batches:
            s = point(model, b, prompt, steps, reps)
            nbytes = roofline.decode_step_bytes(cfg, b, prompt + steps // 2)["total"]
            flops = roofline.decode_flops(cfg, b, prompt + steps // 2)
            rows.append({"experts": e, "batch": b, "ms_per_step": 1e3 * s, "bytes_per_step": nbytes,
                         "gb_per_s": nbytes / s / 1e9, "flops_per_step": flops, "gflop_per_s": flops / s / 1e9})
            log(f"E={e:3d} B={b:2d}: {1e3 * s:7.1f} ms/step, {nbytes / 1e6:7.1f} MB, {nbytes / s / 1e9:5.2f} GB/s, "
                f"{flops / s / 1e9:5.1f} GFLOP/s")
        del model
    return rows


def markdown(rows: list[dict], command: str, machine: str) -> str:
    lines = [f"`{command}` on {machine}; median of the repetitions, bf16 compute, fp8 weights.", "",
             "| routed experts | batch | ms / step | MB / step (must read) | GB/s | GFLOP / step | GFLOP/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['experts']} | {r['batch']} | {r['ms_per_step']:.1f} | {r['bytes_per_step'] / 1e6:.1f} "
                     f"| {r['gb_per_s']:.2f} | {r['flops_per_step'] / 1e9:.2f} | {r['gflop_per_s']:.1f} |")
    return "\n".join(lines)
