"""kimi_jax against Hugging Face transformers on the same weights, and against the bandwidth roofline.

Used by scripts/bench.py. One run, one process for the timings: kimi_jax (block-fp8 weights, bf16
compute) and transformers' DeepseekV3ForCausalLM (the same weights dequantized to bf16, torch CPU)
are timed *alternately*, repetition by repetition, so that load from other processes on a shared
machine hits both alike; figures are medians and the ratios are the point. Time to first token
(cold / warm persistent compile cache) reuses bench_generation's fresh-process children. Peak
memory (VmHWM) is reset once the weights are loaded (loading maps the checkpoint files, whose pages
count too: that peak is reported apart) and read after kimi_jax has compiled and run every measured
shape once, before the transformers model exists, so it is kimi_jax's alone.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kimi_jax.bench import roofline
from kimi_jax.bench.generation import machine, ttft_figures
from kimi_jax.bench.oracle import hf_model
from kimi_jax.bench.profile import decode_step_parts
from kimi_jax.bench.profile import markdown as profile_table
from kimi_jax.bench.timing import status_kb, timed_stream
from kimi_jax.checkpoint.hf import save_hf_checkpoint
from kimi_jax.config import KIMI_K2, TINY_KIMI, Config
from kimi_jax.model.weights import param_bytes, random_params
from kimi_jax.runtime.engine import load
from kimi_jax.runtime.requests import make_requests

# Kimi-K2's structure scaled to a 2-core, 24 GiB machine: ~0.7 GB of weights, most of it fp8 experts.
BENCH = dataclasses.replace(
    KIMI_K2, name="bench", vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256,
    num_hidden_layers=6, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=384, kv_lora_rank=256,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=128, num_experts_per_tok=8,
    max_position_embeddings=4096, bos_token_id=None, eos_token_id=None)
TINY = dataclasses.replace(TINY_KIMI, name="tiny")
CONFIGS: dict[str, Config] = {"bench": BENCH, "tiny": TINY}


@dataclasses.dataclass(frozen=True)
class Settings:
    """How much to measure: repetitions, decode steps, prompt lengths."""

    reps: int = 5
    decode_steps: int = 64
    decode_prompt: int = 16
    prefill_prompt: int = 512
    ttft_reps: int = 3
    batches: tuple[int, ...] = (1, 8)


FULL = Settings()
QUICK = Settings(reps=5, decode_steps=16, ttft_reps=1)
SMOKE = Settings(reps=1, decode_steps=8, decode_prompt=8, prefill_prompt=32, ttft_reps=1, batches=(1,))


def write_checkpoint(cfg: Config, directory: Path) -> tuple[Path, float]:
    """Random block-fp8 weights for `cfg` in hub layout, written once per directory -> (path, seconds spent)."""
    start = time.perf_counter()
    if not (directory / "config.json").is_file():
        save_hf_checkpoint(random_params(cfg, seed=0, std=0.05), cfg, directory, num_shards=2)
    return directory, time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Run each timing function once as warm-up, then `reps` rounds of all of them in turn."""
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            out[name].append(fn())
    return out


# kimi_jax side ---------------------------------------------------------------------------------
def random_prompts(cfg: Config, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    """`batch` prompts of `length` token ids drawn uniformly from the vocabulary (seeded)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, cfg.vocab_size, length).tolist() for _ in range(batch)]


def kimi_prefill(model, prompt_len: int) -> Callable[[], float]:
    """Seconds for one prefill of a `prompt_len`-token prompt (cache built, first token sampled)."""
    requests = make_requests(model.config, random_prompts(model.config, 1, prompt_len), 1, temperature=0.0,
                             stop_token_ids=[])

    def run() -> float:
        start = time.perf_counter()
        first = model.generator.prefill(requests)[-1]
        np.asarray(first)
        return time.perf_counter() - start
    return run


def kimi_decode(model, batch: int, s: Settings) -> Callable[[], float]:
    """Seconds per decode step (all rows together) over `s.decode_steps` greedy steps after prefill."""
    requests = make_requests(model.config, random_prompts(model.config, batch, s.decode_prompt), s.decode_steps + 1,
                             temperature=0.0, stop_token_ids=[])

    def run() -> float:
        _, seconds, tokens = timed_stream(model.generator, requests)
        return seconds / (tokens / batch)
    return run


# transformers side -----------------------------------------------------------------------------
def hf_prefill(hf, cfg: Config, prompt_len: int) -> Callable[[], float]:
    import torch

    ids = torch.tensor(random_prompts(cfg, 1, prompt_len))

    def run() -> float:
        with torch.no_grad():
            start = time.perf_counter()
            out = hf(ids, use_cache=True, logits_to_keep=1)
            out.logits[:, -1].argmax(-1)
            return time.perf_counter() - start
    return run


def hf_decode(hf, cfg: Config, batch: int, s: Settings) -> Callable[[], float]:
    """Seconds per greedy decode step with transformers' own cache (prefill not timed)."""
    import torch

    ids = torch.tensor(random_prompts(cfg, batch, s.decode_prompt))

    def run() -> float:
        with torch.no_grad():
            out = hf(ids, use_cache=True, logits_to_keep=1)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for _ in range(s.decode_steps):
                out = hf(nxt, past_key_values=cache, use_cache=True)
                cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            return (time.perf_counter() - start) / s.decode_steps
    return run


# The whole run -----------------------------------------------------------------------------------
def run(config: str, s: Settings, cache_dir: Path, with_ttft: bool = True, with_profile: bool = True,
        log=print) -> dict:
    """Every figure for one config; returns the flat result dict printed by `scripts/bench.py --json`."""
    import jax
    import torch


    cfg = CONFIGS[config]
    path, write_s = write_checkpoint(cfg, cache_dir / cfg.name)
    log(f"checkpoint {path} ({write_s:.1f} s to write; 0 when cached)")
    bandwidth = roofline.host_copy_bandwidth(1 << 30 if config != "tiny" else 64 << 20)
    log(f"host copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    jax.numpy.zeros(1).block_until_ready()
    baseline = status_kb("VmRSS") * 1024  # jax and torch imported, nothing loaded
    model = load(path, dtype="bfloat16")
    weight_bytes = param_bytes(model.params)
    gc.collect()  # the loader's host copies are garbage now: do not count them as kimi_jax's memory
    load_peak, after_load = status_kb("VmHWM") * 1024, status_kb("VmRSS") * 1024
    # Reset the peak to the current RSS: what follows is the peak of compiling and running.
    Path("/proc/self/clear_refs").write_text("5")
    fns = {"prefill": kimi_prefill(model, s.prefill_prompt)}
    for b in s.batches:
        fns[f"decode_b{b}"] = kimi_decode(model, b, s)
    for fn in fns.values():  # compile, and the peak of kimi_jax alone before transformers holds memory
        fn()
    peak = status_kb("VmHWM") * 1024
    log(f"kimi_jax compiled; peak RSS {peak / 1e9:.2f} GB (baseline {baseline / 1e9:.2f} GB)")
    start = time.perf_counter()
    hf = hf_model(model.params, cfg, torch.bfloat16)
    log(f"transformers model built in {time.perf_counter() - start:.1f} s; timing "
        f"{s.reps} interleaved repetitions")
    hf_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())

    fns["hf_prefill"] = hf_prefill(hf, cfg, s.prefill_prompt)
    for b in s.batches:
        fns[f"hf_decode_b{b}"] = hf_decode(hf, cfg, b, s)
    times = {k: statistics.median(v) for k, v in interleaved(fns, s.reps).items()}
    log("median seconds: " + ", ".join(f"{k} {v:.4f}" for k, v in times.items()))
    del hf

    out: dict = {"config": config, "machine": machine(), "torch_threads": torch.get_num_threads(),
                 "jax_backend": jax.default_backend(), "checkpoint_write_s": write_s, "reps": s.reps,
                 "decode_steps": s.decode_steps, "weight_bytes": weight_bytes, "hf_weight_bytes": hf_bytes,
                 "host_bandwidth_bytes_per_s": bandwidth,
                 "prefill_prompt": s.prefill_prompt,
                 "prefill_tokens_per_s": s.prefill_prompt / times["prefill"],
                 "hf_prefill_tokens_per_s": s.prefill_prompt / times["hf_prefill"]}
    out["prefill_speedup_vs_transformers"] = out["prefill_tokens_per_s"] / out["hf_prefill_tokens_per_s"]
    context = s.decode_prompt + s.decode_steps // 2  # the mean number of cached tokens read
    for i, b in enumerate(s.batches):
        suffix = "" if i == 0 else f"_b{b}"
        step, hf_step = times[f"decode_b{b}"], times[f"hf_decode_b{b}"]
        need = roofline.decode_step_bytes(cfg, b, context)
        out[f"decode_tokens_per_s{suffix}"] = b / step
        out[f"hf_decode_tokens_per_s{suffix}"] = b / hf_step
        out[f"decode_speedup_vs_transformers{suffix}"] = hf_step / step
        out[f"decode_step_bytes{suffix}"] = need["total"]
        out[f"experts_hit_per_layer_estimate{suffix}"] = need["experts_hit_per_layer"]
        out[f"decode_roofline_fraction{suffix}"] = roofline.roofline_fraction(need["total"], bandwidth, step)
        out[f"hf_decode_roofline_fraction{suffix}"] = roofline.roofline_fraction(need["total"], bandwidth, hf_step)
    if with_profile:
        log("profile of one decode step at batch 1 (ablation)")
        out["profile_b1_s"] = decode_step_parts(model, 1, context)
        out["decode_step_in_loop_b1_s"] = times[f"decode_b{s.batches[0]}"]
    del model
    out.update(peak_rss_bytes=peak, baseline_rss_bytes=baseline, peak_over_baseline_bytes=peak - baseline,
               load_peak_rss_bytes=load_peak, after_load_rss_bytes=after_load)
    out["peak_over_baseline_vs_weights"] = out["peak_over_baseline_bytes"] / weight_bytes
    if with_ttft:
        log("time to first token in fresh processes")
        out.update(ttft_figures(path, "bfloat16", s.ttft_reps))
    return out


def markdown(r: dict, command: str) -> str:
    """The table for BENCHMARKS.md."""
    gb = 1e9
    rows = [(f"prefill tokens/s (prompt {r['prefill_prompt']}, batch 1)", r["prefill_tokens_per_s"],
             r["hf_prefill_tokens_per_s"], r["prefill_speedup_vs_transformers"], None)]
    for key, b in (("", 1), ("_b8", 8)):
        if f"decode_tokens_per_s{key}" in r:
            rows.append((f"decode tokens/s, batch {b}", r[f"decode_tokens_per_s{key}"],
                         r[f"hf_decode_tokens_per_s{key}"], r[f"decode_speedup_vs_transformers{key}"],
                         (r[f"decode_roofline_fraction{key}"], r[f"hf_decode_roofline_fraction{key}"],
                          r[f"decode_step_bytes{key}"], r[f"experts_hit_per_layer_estimate{key}"])))
    lines = [f"Command: `{command}`", "", f"Machine: {r['machine']}; torch threads {r['torch_threads']}.", "",
             "| figure | kimi_jax | transformers | kimi_jax / transformers "
             "| roofline reached (kimi_jax, transformers) |",
             "|---|---:|---:|---:|---|"]
    for name, ours, theirs, ratio, roof in rows:
        extra = "" if roof is None else (f"{100 * roof[0]:.1f}%, {100 * roof[1]:.1f}% of {roof[2] / 1e6:.0f} MB/step "
                                         f"(≈{roof[3]:.1f} experts/layer, estimated)")
        lines.append(f"| {name} | {ours:.1f} | {theirs:.1f} | {ratio:.2f}× | {extra} |")
    lines += ["", f"- Weights: {r['weight_bytes'] / gb:.3f} GB block-fp8 for kimi_jax, "
                  f"{r['hf_weight_bytes'] / gb:.3f} GB bf16 for transformers; checkpoint write "
                  f"{r['checkpoint_write_s']:.0f} s (0 when cached).",
              f"- Host copy bandwidth (numpy, read + write): {r['host_bandwidth_bytes_per_s'] / gb:.1f} GB/s.",
              f"- kimi_jax RSS: {r['baseline_rss_bytes'] / gb:.2f} GB after imports, "
              f"{r['after_load_rss_bytes'] / gb:.2f} GB after loading (peak while loading "
              f"{r['load_peak_rss_bytes'] / gb:.2f} GB), peak while compiling and running every measured shape "
              f"{r['peak_rss_bytes'] / gb:.2f} GB; that peak over the post-import baseline is "
              f"{r['peak_over_baseline_bytes'] / gb:.2f} GB = {r['peak_over_baseline_vs_weights']:.2f}× the "
              "weight bytes."]
    if "ttft_cold_cache_s" in r:
        lines.append(f"- Time to first token, fresh process, 16-token prompt: cold compile cache "
                     f"{r['ttft_cold_cache_s']:.2f} s, warm {r['ttft_warm_cache_s']:.2f} s.")
    if "profile_b1_s" in r:
        lines += ["", "Where one decode step's time goes (batch 1, parts timed alone, dispatch subtracted):", "",
                  profile_table(r["profile_b1_s"], r["decode_step_in_loop_b1_s"])]
    return "\n".join(lines) + "\n"
