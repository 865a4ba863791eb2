"""End-to-end generation against transformers on CPU (issue 14's CPU targets): a 64-token prompt and
32 new tokens, greedy, at batch 1 and 8, on the bench config with 64 and with 128 routed experts.

One process. kimi_jax (block-fp8 weights, bf16 compute, `Generator.generate`: prefill, then decode
calls) and transformers' DeepseekV3ForCausalLM (`generate`, the same weights dequantized) in
bfloat16 and in float32 are timed alternately, repetition by repetition, after one warm-up call
each (kimi_jax's programs compiled then); medians. The ratio is taken against whichever of
transformers' dtypes was faster at that point, measured here, not assumed. Prefill alone (one
512-token prompt) is timed the same way.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from kimi_jax.bench.compare import BENCH, hf_prefill, interleaved, kimi_prefill, random_prompts, write_checkpoint
from kimi_jax.bench.generation import machine
from kimi_jax.bench.oracle import hf_model
from kimi_jax.config import Config
from kimi_jax.runtime.engine import load
from kimi_jax.runtime.requests import make_requests


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to measure: expert counts, batches, the prompt and the reply, repetitions."""

    base: Config = BENCH  # the widths; `experts` replaces its routed-expert count
    experts: tuple[int, ...] = (64, 128)
    batches: tuple[int, ...] = (1, 8)
    prompt: int = 64
    new: int = 32
    prefill_prompt: int = 512
    reps: int = 5


def kimi_generate(model, batch: int, s: Settings) -> Callable[[], float]:
    """Seconds for kimi_jax to generate `s.new` tokens for each of `batch` prompts of `s.prompt` tokens."""
    requests = make_requests(model.config, random_prompts(model.config, batch, s.prompt), s.new, temperature=0.0,
                             stop_token_ids=[])

    def run() -> float:
        start = time.perf_counter()
        done = model.generator.generate(requests)
        elapsed = time.perf_counter() - start
        if any(len(c.token_ids) != s.new for c in done):
            raise RuntimeError(f"kimi_jax made {[len(c.token_ids) for c in done]} tokens, not {s.new} each")
        return elapsed
    return run


def hf_generate(hf, cfg, batch: int, s: Settings) -> Callable[[], float]:
    """Seconds for transformers' `generate` to make exactly `s.new` greedy tokens per row."""
    import torch

    ids = torch.tensor(random_prompts(cfg, batch, s.prompt))
    mask = torch.ones_like(ids)

    def run() -> float:
        with torch.no_grad():
            start = time.perf_counter()
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=s.new, min_new_tokens=s.new, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
            elapsed = time.perf_counter() - start
        if out.shape[1] != s.prompt + s.new:
            raise RuntimeError(f"transformers made {out.shape[1] - s.prompt} tokens, not {s.new}")
        return elapsed
    return run


def run(s: Settings, cache_dir: Path, log=print) -> list[dict]:
    """One row per (experts, figure): kimi_jax's and transformers' median seconds and the ratio."""
    import torch

    rows = []
    for experts in s.experts:
        cfg = dataclasses.replace(s.base, name=f"{s.base.name}-e{experts}", n_routed_experts=experts)
        path, _ = write_checkpoint(cfg, cache_dir / cfg.name)
        model = load(path, dtype="bfloat16")
        hfs = {name: hf_model(model.params, cfg, dtype) for name, dtype in
               (("bf16", torch.bfloat16), ("fp32", torch.float32))}
        fns: dict[str, Callable[[], float]] = {"kimi prefill": kimi_prefill(model, s.prefill_prompt)}
        for name, hf in hfs.items():
            fns[f"hf {name} prefill"] = hf_prefill(hf, cfg, s.prefill_prompt)
        for b in s.batches:
            fns[f"kimi b{b}"] = kimi_generate(model, b, s)
            for name, hf in hfs.items():
                fns[f"hf {name} b{b}"] = hf_generate(hf, cfg, b, s)
        log(f"{experts} experts: {len(fns)} figures, {s.reps} interleaved repetitions")
        times = {k: statistics.median(v) for k, v in interleaved(fns, s.reps).items()}
        for figure in ["prefill", *(f"b{b}" for b in s.batches)]:
            hf_times = {name: times[f"hf {name} {figure}"] for name in hfs}
            best = min(hf_times, key=hf_times.get)
            rows.append({"experts": experts, "figure": figure, "kimi_s": times[f"kimi {figure}"],
                         **{f"hf_{name}_s": t for name, t in hf_times.items()}, "hf_best": best,
                         "speedup": hf_times[best] / times[f"kimi {figure}"]})
            log(f"  {figure}: {rows[-1]}")
        del model, hfs
    return rows


def markdown(rows: list[dict], s: Settings, command: str) -> str:
    lines = [f"`{command}` — {machine()}", "",
             f"Generate = a {s.prompt}-token prompt + {s.new} new tokens per row, greedy; prefill = one "
             f"{s.prefill_prompt}-token prompt; medians of {s.reps} interleaved repetitions (seconds).", "",
             "| routed experts | figure | kimi_jax s | transformers bf16 s | transformers fp32 s | kimi_jax ÷ faster |",
             "|---:|---|---:|---:|---:|---:|"]
    names = {"prefill": "prefill", **{f"b{b}": f"generate, batch {b}" for b in s.batches}}
    for r in rows:
        lines.append(f"| {r['experts']} | {names[r['figure']]} | {r['kimi_s']:.3f} | {r['hf_bf16_s']:.3f} "
                     f"| {r['hf_fp32_s']:.3f} | **{r['speedup']:.2f}×** ({r['hf_best']}) |")
    return "\n".join(lines)

