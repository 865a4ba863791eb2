"""Conversion throughput, peak memory and restore time on a synthetic block-fp8 checkpoint (>= 2 GB).

    .venv/bin/python scripts/bench_convert.py [--gb 2.2] [--work /tmp/kimi-bench-convert] [--hosts 8 16 32 64]

Writes a release-layout HF checkpoint of random fp8 bytes (no model maths: only I/O is timed),
converts it in a subprocess (`python -m kimi_jax.convert`, peak RSS from the kernel), restores
the orbax and the HF directory in subprocesses, and prints a markdown report with an estimate
for the real 959 GB checkpoint on a pod of N hosts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kimi_jax.checkpoint.hf import SCALE_SUFFIX, expected_names  # noqa: E402
from kimi_jax.checkpoint.orbax import group_bytes, total_bytes  # noqa: E402
from kimi_jax.checkpoint.safetensors import save_file, write_index  # noqa: E402
from kimi_jax.config import KIMI_K2, TINY_KIMI  # noqa: E402
from kimi_jax.model.weights import leaves, scale_shape  # noqa: E402

REAL_BYTES = 958.5e9
SHARD_BYTES = 256 << 20


def bench_config(gb: float):
    """Kimi-K2's structure with a narrower model and few layers, sized to about `gb` GB."""
    base = dataclasses.replace(TINY_KIMI, hidden_size=2048, intermediate_size=4096, moe_intermediate_size=1024,
                               num_attention_heads=16, q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64,
                               qk_rope_head_dim=32, v_head_dim=64, vocab_size=32768, n_routed_experts=64,
                               num_experts_per_tok=8, weight_block_size=(128, 128), name="bench")
    layers = 2
    while total_bytes(dataclasses.replace(base, num_hidden_layers=layers)) < gb * 1e9:
        layers += 1
    return dataclasses.replace(base, num_hidden_layers=layers)


def write_synthetic(cfg, directory: Path) -> int:
    """Random tensors in the release layout, streamed into ~256 MB shards; returns bytes written."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    weight_map, batch, size, shard, total = {}, {}, 0, 1, 0

    def flush():
        nonlocal batch, size, shard
        name = f"model-{shard}.safetensors"
        save_file(batch, directory / name)
        weight_map.update({n: name for n in batch})
        batch, size, shard = {}, 0, shard + 1

    for leaf in leaves(cfg):
        per = leaf.spec.shape[1:] if leaf.spec.per_expert else leaf.spec.shape
        for _, name in expected_names(leaf):
            if leaf.spec.quantized:  # random bytes with bit 6 clear: finite fp8 (no 0x7f/0xff NaN)
                tensors = {name: (rng.integers(0, 256, per, np.uint8) & 0xBF).view("float8_e4m3fn"),
                           name + SCALE_SUFFIX: rng.random(scale_shape(per, cfg.weight_block_size), np.float32)}
            else:
                tensors = {name: rng.standard_normal(per, np.float32).astype(np.dtype(leaf.spec.dtype)
                                                                             if leaf.spec.dtype == "float32"
                                                                             else "bfloat16")}
            for n, a in tensors.items():
                batch[n], size, total = a, size + a.nbytes, total + a.nbytes
            if size >= SHARD_BYTES:
                flush()
    if batch:
        flush()
    write_index(directory, weight_map, total)
    (directory / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    return total


def timed(code: list[str], env: dict) -> tuple[float, float, float]:
    """(seconds, peak RSS GB, peak anonymous RSS GB) of a child process.

    Peak RSS (the kernel's, from wait4) counts touched pages of memory-mapped files, which the
    kernel can drop at will; the anonymous peak (sampled every 50 ms) is the memory really held.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(code, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    anon = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaps the child and returns its rusage
        if pid:
            break
        try:
            text = Path(f"/proc/{proc.pid}/status").read_text()
            anon = max(anon, int(text.split("RssAnon:")[1].split()[0]))
        except (OSError, IndexError):
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{code[:4]} failed with status {proc.returncode}")
    peak = usage.ru_maxrss / 1e6  # KB -> GB
    return seconds, peak, anon / 1e6


RESTORE = """
import sys, time, jax, kimi_jax
t = time.perf_counter(); m = kimi_jax.load(sys.argv[1]); jax.block_until_ready(m.params)
print(time.perf_counter() - t)
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=2.2, help="synthetic checkpoint size (default 2.2 GB)")
    p.add_argument("--work", default="/tmp/kimi-bench-convert", help="scratch directory (deleted after)")
    p.add_argument("--hosts", type=int, nargs="+", default=[8, 16, 32, 64])
    args = p.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)
    cfg = bench_config(args.gb)
    try:
        t = time.perf_counter()
        hf_bytes = write_synthetic(cfg, work / "hf")
        write_s = time.perf_counter() - t
        largest = max(group_bytes(cfg, leaf) for leaf in leaves(cfg))
        conv_s, conv_rss, conv_anon = timed([sys.executable, "-m", "kimi_jax.convert", "--hf", str(work / "hf"),
                                  "--out", str(work / "orbax"), "--no-progress"], env)
        orbax_bytes = sum(f.stat().st_size for f in (work / "orbax").rglob("*") if f.is_file())
        os.sync()  # flush the written pages so restore does not race the writeback
        rest_s, rest_rss, rest_anon = timed([sys.executable, "-c", RESTORE, str(work / "orbax")], env)
        hf_s, hf_rss, hf_anon = timed([sys.executable, "-c", RESTORE, str(work / "hf")], env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mbps = hf_bytes / conv_s / 1e6
    restore_mbps = hf_bytes / rest_s / 1e6
    replicated = sum(group_bytes(KIMI_K2, leaf) for leaf in leaves(KIMI_K2) if leaf.path[0] in ("embed", "lm_head"))
    lines = [
        f"synthetic checkpoint: {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts, hidden "
        f"{cfg.hidden_size}: {hf_bytes / 1e9:.2f} GB safetensors (written in {write_s:.1f} s); largest weight "
        f"group {largest / 1e9:.2f} GB",
        "",
        "| step | time (s) | throughput (MB/s) | peak RSS (GB) | peak anonymous RSS (GB) |",
        "|---|---|---|---|---|",
        f"| convert HF -> orbax | {conv_s:.1f} | {mbps:.0f} | {conv_rss:.2f} | {conv_anon:.2f} |",
        f"| restore orbax (1 CPU device) | {rest_s:.1f} | {restore_mbps:.0f} | {rest_rss:.2f} | {rest_anon:.2f} |",
        f"| load HF safetensors (1 CPU device) | {hf_s:.1f} | {hf_bytes / hf_s / 1e6:.0f} | {hf_rss:.2f} | "
        f"{hf_anon:.2f} |",
        "",
        f"orbax directory {orbax_bytes / 1e9:.2f} GB = {orbax_bytes / hf_bytes:.2f}x the safetensors",
        "",
        f"Estimate for Kimi-K2 (958.5 GB): conversion on one host at {mbps:.0f} MB/s: "
        f"{REAL_BYTES / (mbps * 1e6) / 3600:.1f} h. Restore, each host reading its share (the embedding and "
        f"lm_head, {replicated / 1e9:.1f} GB, are read by every host; the rest splits) at {restore_mbps:.0f} MB/s:",
        "",
        "| hosts | bytes per host (GB) | restore (min) |",
        "|---|---|---|",
    ]
    for n in args.hosts:
        per_host = (REAL_BYTES - replicated) / n + replicated
        lines.append(f"| {n} | {per_host / 1e9:.0f} | {per_host / (restore_mbps * 1e6) / 60:.1f} |")
    print("\n".join(lines))
    return 0 if math.isfinite(mbps) else 1


if __name__ == "__main__":
    sys.exit(main())
