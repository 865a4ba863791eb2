"""Where a decode step's time goes, by timing its parts alone (ablation) on the loaded model's weights.

Each part is one jitted call on real weights at decode shapes (batch rows, one token each), timed as
a median; a jitted no-op gives the per-call dispatch cost, subtracted from every part. The parts,
scaled by how many layers run them, are compared with one whole step (`Generator.step_logits`):
    routed experts (the backend's kernel: on CPU fp8 tiles gathered and dequantized)  × MoE layers
    the same on pre-dequantized bf16 expert weights (the difference is the dequant's cost)
    shared expert, dense MLP, absorbed MLA attention, lm_head
Every product goes through the model's backend, as in the step (on one CPU device dense products stream).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.bench.timing import median_seconds
from kimi_jax.model.attention import MLA, LatentCache
from kimi_jax.model.decoder import init_cache
from kimi_jax.model.layers import swiglu
from kimi_jax.model.moe import route
from kimi_jax.model.quant import dequantize


def decode_step_parts(model, batch: int = 1, context: int = 64, reps: int = 20) -> dict[str, float]:
    """Seconds per decode step spent in each part (dispatch subtracted), the sum, and the measured step."""
    cfg, p, dt = model.config, model.params, model.dtype
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, cfg.hidden_size)), dt)
    moe = jax.tree.map(lambda a: a[0], p["moe_layers"])  # layer 0 of the MoE stack
    ffn = moe["ffn"]
    experts = (ffn["experts_gate"], ffn["experts_up"], ffn["experts_down"])
    weights, idx = route(x, ffn["router"], ffn["router_bias"], cfg)
    plain = jax.block_until_ready(tuple(dequantize(w, dt) for w in experts))  # bf16 copies, made once

    noop = jax.jit(lambda a: a + 1)
    backend, layout = model.backend, model.generator.layout
    routed = jax.jit(lambda x, w, i, e: layout.experts(backend.experts)(x, w, i, *e))
    mlp = jax.jit(lambda x, g, u, d: swiglu(x, g, u, d, backend.linear))
    head = jax.jit(lambda x, w: backend.logits(x, w, dt))
    mla = MLA(cfg, True, backend, layout)
    cache = LatentCache(jnp.zeros((batch, context, cfg.kv_lora_rank), dt),
                        jnp.zeros((batch, context, cfg.qk_rope_head_dim), dt))
    positions = jnp.full((batch, 1), context // 2, jnp.int32)
    attn = jax.jit(lambda pa, x, c: mla.apply({"params": pa}, x[:, None], positions, c)[0])

    dispatch = median_seconds(lambda: noop(x), reps)
    part = {"dispatch_per_call": dispatch}

    def timed(fn: Callable[[], object]) -> float:
        return max(0.0, median_seconds(fn, reps) - dispatch)

    n_moe, n_dense = cfg.num_moe_layers, cfg.num_dense_layers
    part["routed_experts_fp8"] = n_moe * timed(lambda: routed(x, weights, idx, experts))
    part["routed_experts_bf16_predequantized"] = n_moe * timed(lambda: routed(x, weights, idx, plain))
    part["shared_expert"] = n_moe * timed(lambda: mlp(x, ffn["shared_gate"], ffn["shared_up"], ffn["shared_down"]))
    if n_dense:
        dense = jax.tree.map(lambda a: a[0], p["dense_layers"])["ffn"]
        part["dense_mlp"] = n_dense * timed(lambda: mlp(x, dense["gate"], dense["up"], dense["down"]))
    part["attention"] = cfg.num_hidden_layers * timed(lambda: attn(moe["attn"], x, cache))
    part["lm_head"] = timed(lambda: head(x, p["lm_head"]))
    part["sum_of_parts"] = sum(v for k, v in part.items()
                               if k not in ("dispatch_per_call", "routed_experts_bf16_predequantized"))

    full_cache = init_cache(cfg, batch, context, dt)
    tokens = jnp.zeros((batch,), jnp.int32)
    pos = jnp.full((batch,), context // 2, jnp.int32)
    step = model.generator.step_logits

    def one_step():
        nonlocal full_cache
        logits, full_cache = step(model.params, full_cache, tokens, pos)
        return logits
    part["whole_step_one_call"] = median_seconds(one_step, reps)
    return part


def markdown(parts: dict[str, float], measured_step_s: float | None = None) -> str:
    lines = ["| part of one decode step | ms |", "|---|---:|"]
    lines += [f"| {k.replace('_', ' ')} | {1e3 * v:.2f} |" for k, v in parts.items()]
    if measured_step_s:
        lines.append(f"| step inside the 8-step decode loop (bench) | {1e3 * measured_step_s:.2f} |")
    return "\n".join(lines) + "\n"
