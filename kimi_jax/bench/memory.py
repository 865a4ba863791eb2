"""Peak memory of a forward pass against the fp8 weight bytes (issue: no bf16 copy of a scanned stack).

Each measurement runs in a fresh process so peaks do not mix: the parent writes one hub-layout
checkpoint, then a child per variant loads it and runs forwards, reporting (from /proc/self/status)
its resident memory after imports (the baseline), after loading, and its peak during the forwards
(VmHWM reset with /proc/self/clear_refs once loading is done).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

import kimi_jax
from kimi_jax import kernels
from kimi_jax.bench.timing import status_kb
from kimi_jax.checkpoint.hf import load_hf_params, save_hf_checkpoint
from kimi_jax.config import TINY_KIMI, Config
from kimi_jax.model.weights import param_bytes, random_params
from kimi_jax.runtime.engine import Model

# ~1.1 GB of fp8 expert weights: 7 MoE layers x 96 experts x 3 x 512 x 1024.
MEMORY_BENCH = dataclasses.replace(
    TINY_KIMI, name="bench-memory", vocab_size=4096, hidden_size=1024, intermediate_size=2048,
    moe_intermediate_size=512, num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=8,
    q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    n_routed_experts=96, num_experts_per_tok=8)


def child(path: str, storage: str, tokens: int) -> dict:
    """Runs inside the measuring process: load, forward, report bytes."""
    jax.numpy.zeros(1).block_until_ready()  # initialise the backend before the baseline
    baseline = status_kb("VmRSS") * 1024
    cfg = kimi_jax.Config.from_json(path)
    # storage "fp8" holds float8_e4m3fn on CPU (what a GPU/TPU holds): shows XLA's f16 hoisting.
    fp8 = np.dtype("float8_e4m3fn") if storage == "fp8" else kernels.for_devices().fp8_storage
    params = load_hf_params(path, cfg, storage=fp8)
    model = Model(cfg, params, dtype="bfloat16")
    loaded = status_kb("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, tokens))
    start = time.perf_counter()
    model.logits(ids)
    compile_and_run = time.perf_counter() - start
    start = time.perf_counter()
    model.logits(ids)
    run = time.perf_counter() - start
    peak = status_kb("VmHWM") * 1024
    return {"storage": storage, "weight_bytes": param_bytes(params), "baseline_rss": baseline,
            "after_load_rss": loaded, "forward_peak_rss": peak, "peak_over_baseline": peak - baseline,
            "ratio": (peak - baseline) / param_bytes(params), "first_forward_s": compile_and_run,
            "forward_s": run}


def measure(path: Path, storages=("native", "fp8"), tokens: int = 64) -> list[dict]:
    """One child process per storage variant, side by side on the same checkpoint."""
    out = []
    for storage in storages:
        code = (f"import json; from kimi_jax.bench.memory import child; "
                f"print(json.dumps(child({str(path)!r}, {storage!r}, {tokens})))")
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def write_checkpoint(cfg: Config, path: Path, seed: int = 0) -> Path:
    if not (path / "model.safetensors.index.json").exists():
        save_hf_checkpoint(random_params(cfg, seed=seed), cfg, path, num_shards=4)
    return path
