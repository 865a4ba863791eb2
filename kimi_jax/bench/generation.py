"""Generation benchmarks: decode tokens/s, time to first token (cold and warm compile cache), cache bytes.

Used by scripts/bench_generate.py. Every figure is a median over `reps` repetitions. Time to first
token with a cold or warm *persistent* compile cache is measured in fresh processes (the first
with an empty cache directory, the next ones reusing it), since within one process JAX's
in-memory cache would hide compilation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from kimi_jax.bench.timing import timed_stream
from kimi_jax.checkpoint.hf import save_hf_checkpoint
from kimi_jax.config import KIMI_K2, Config
from kimi_jax.model.decoder import init_cache
from kimi_jax.model.weights import random_params
from kimi_jax.runtime.default_model import random_checkpoint
from kimi_jax.runtime.engine import load
from kimi_jax.runtime.generation import expanded_cache_bytes_per_token_per_layer, kv_cache_bytes_per_token_per_layer
from kimi_jax.runtime.requests import make_requests

# A larger CPU bench shape: Kimi-K2's structure at hidden 1024, 4 layers (1 dense), 64 experts top-8.
BENCH_CONFIG = dataclasses.replace(
    KIMI_K2, vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256,
    num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=384, kv_lora_rank=256,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64, num_experts_per_tok=8,
    max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, name="bench-1024",
)


def write_bench_checkpoint(directory: Path, cfg: Config = BENCH_CONFIG) -> Path:
    """Random block-fp8 weights for `cfg` in hub layout (written once per directory)."""
    if not (directory / "config.json").is_file():
        save_hf_checkpoint(random_params(cfg, seed=0, std=0.05), cfg, directory, num_shards=2)
    return directory


def decode_figures(model, batch: int, prompt_len: int = 16, new_tokens: int = 64, reps: int = 5,
                   steps_per_call: int | None = None) -> dict:
    """Median decode tokens/s (all rows together) and warm time to first token for one batch size."""
    gen = model.generator
    if steps_per_call is not None:
        gen.steps_per_call = steps_per_call
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.config.vocab_size, prompt_len).tolist() for _ in range(batch)]
    requests = make_requests(model.config, prompts, new_tokens, temperature=0.0, stop_token_ids=[])
    timed_stream(gen, requests)  # compile
    runs = [timed_stream(gen, requests) for _ in range(reps)]
    return {"batch": batch, "steps_per_call": gen.steps_per_call,
            "decode_tokens_per_s": statistics.median(n / t for _, t, n in runs),
            "ms_per_step": statistics.median(1e3 * t / (n / batch) for _, t, n in runs),
            "ttft_warm_s": statistics.median(f for f, _, _ in runs)}


def ttft_in_fresh_process(checkpoint: Path | None, compile_cache: Path, dtype: str) -> dict:
    """Run `child_ttft` in a new Python process with the given persistent compile cache directory."""
    root = str(Path(__file__).resolve().parents[1])  # so the child imports this kimi_jax
    env = dict(os.environ, KIMI_JAX_COMPILE_CACHE=str(compile_cache),
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    code = ("import json, sys; from kimi_jax.bench.generation import child_ttft; "
            "print(json.dumps(child_ttft(*sys.argv[1:])))")
    args = [sys.executable, "-c", code, str(checkpoint or ""), dtype]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_ttft(checkpoint: str, dtype: str) -> dict:
    """In a fresh process: load, then time one prompt's first token (tracing + compile or cache load + run)."""
    t0 = time.perf_counter()
    model = load(checkpoint or random_checkpoint(), dtype=dtype)
    t1 = time.perf_counter()
    next(iter(model.stream(list(range(1, 17)), max_new_tokens=2, temperature=0)))
    return {"load_s": t1 - t0, "ttft_s": time.perf_counter() - t1}


def ttft_figures(checkpoint: Path | None, dtype: str, reps: int = 5) -> dict:
    """Median time to first token in fresh processes: cold (empty compile cache) and warm (cache reused)."""
    cold, warm = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(reps):
            cold.append(ttft_in_fresh_process(checkpoint, Path(tmp) / f"cold{i}", dtype)["ttft_s"])
        for _ in range(reps):
            warm.append(ttft_in_fresh_process(checkpoint, Path(tmp) / "cold0", dtype)["ttft_s"])
    return {"ttft_cold_cache_s": statistics.median(cold), "ttft_warm_cache_s": statistics.median(warm)}


def cache_figures(model) -> dict:
    """KV-cache bytes per token per layer: the latent cache (measured on an allocated cache) vs per-head K/V."""
    cfg = model.config
    cache = jax.eval_shape(lambda: init_cache(cfg, 2, 64, model.dtype))
    measured = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) // (2 * 64 * cfg.num_hidden_layers)
    assert measured == kv_cache_bytes_per_token_per_layer(cfg, model.dtype)
    return {"kv_bytes_per_token_per_layer": int(measured),
            "expanded_kv_bytes_per_token_per_layer": expanded_cache_bytes_per_token_per_layer(cfg, model.dtype),
            "kimi_k2_kv_bytes_per_token_per_layer": kv_cache_bytes_per_token_per_layer(KIMI_K2),
            "kimi_k2_expanded_bytes_per_token_per_layer": expanded_cache_bytes_per_token_per_layer(KIMI_K2)}


def describe(cfg: Config) -> str:
    """The shape of a config in one line."""
    return (f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers ({cfg.first_k_dense_replace} dense), "
            f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}, {cfg.num_attention_heads} heads, "
            f"latent {cfg.kv_lora_rank} + rope {cfg.qk_rope_head_dim}, vocab {cfg.vocab_size}, block-fp8 weights")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())  # the machine may be shared: say how busy it was
    return (f"{cpu}, {os.cpu_count()} cores visible, {jax.default_backend()} backend "
            f"({len(jax.devices())} devices), jax {jax.__version__}, python {platform.python_version()}; "
            f"load average {load} when the report was written")


def run_all(models: dict[str, Path | None], dtype: str, reps: int, new_tokens: int) -> dict:
    """All figures for each named checkpoint (None: the random-weight TINY_KIMI checkpoint)."""
    results = {}
    for name, path in models.items():
        model = load(path or random_checkpoint(), dtype=dtype)
        rows = [decode_figures(model, b, new_tokens=new_tokens, reps=reps) for b in (1, 8)]
        rows.append(decode_figures(model, 1, new_tokens=new_tokens, reps=reps, steps_per_call=1))
        results[name] = {"config": describe(model.config), "decode": rows, **ttft_figures(path, dtype, reps),
                         **cache_figures(model)}
    return results


def markdown(results: dict, command: str, dtype: str) -> str:
    """The report for BENCHMARKS.md (Generation)."""
    lines = ["# Generation benchmark", "", f"Command: `{command}`", "", f"Machine: {machine()}", "",
             f"Compute dtype {dtype}; greedy; 16-token random prompts; medians of the repetitions. Decode "
             "tokens/s counts every row of the batch. Time to first token (TTFT) with a cold / warm "
             "persistent compile cache is measured in fresh processes (load excluded; tracing, "
             "compilation or cache load, and prefill included).", ""]
    for name, r in results.items():
        lines += [f"## {name} ({r['config']})", "",
                  "| batch | steps per compiled call | decode tokens/s | ms per step | warm TTFT (s) |",
                  "|---:|---:|---:|---:|---:|"]
        for row in r["decode"]:
            lines.append(f"| {row['batch']} | {row['steps_per_call']} | {row['decode_tokens_per_s']:.1f} | "
                         f"{row['ms_per_step']:.2f} | {row['ttft_warm_s']:.3f} |")
        lines += ["", f"- TTFT in a fresh process: cold compile cache {r['ttft_cold_cache_s']:.2f} s, "
                      f"warm compile cache {r['ttft_warm_cache_s']:.2f} s",
                  f"- KV cache per token per layer: {r['kv_bytes_per_token_per_layer']} bytes (latent + rope key) "
                  f"vs {r['expanded_kv_bytes_per_token_per_layer']} bytes for per-head K/V", ""]
    any_r = next(iter(results.values()))
    lines += [f"Kimi-K2 itself: {any_r['kimi_k2_kv_bytes_per_token_per_layer']} bytes per token per layer in bf16 "
              f"(576 values) instead of {any_r['kimi_k2_expanded_bytes_per_token_per_layer']} "
              "(64 heads x (192 + 128)), 35.6x less.", ""]
    return "\n".join(lines)
