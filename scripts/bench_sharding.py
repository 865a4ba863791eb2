"""Sharding benchmarks: EP vs replicated experts on 8 fake CPU devices, MoE strategies, the planner.

    .venv/bin/python scripts/bench_sharding.py [--runs 7] [--parts moe,model,planner] [--out docs/sharding_bench.md]

Prints (or writes) markdown. The measurements themselves live in kimi_jax/bench/sharding.py.
"""

import argparse
import os
import platform
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the device count is set)

from kimi_jax.bench import sharding as bench  # noqa: E402

KIMI = "/work/shared/reference/kimi-k2-instruct/config.json"
GiB = 1024 ** 3
# (name, mesh, hardware, batch, context): recommended layouts for Kimi-K2 (dp_attention rules).
RECOMMENDED = [
    ("TPU v5e-256", "data=1,expert=32,tensor=8", "v5e", 64, 16384),
    ("TPU v5p-64", "data=1,expert=16,tensor=4", "v5p", 128, 32768),
    ("TPU v6e-64", "data=1,expert=16,tensor=4", "v6e", 32, 16384),
    ("TPU v6e-128", "data=1,expert=32,tensor=4", "v6e", 64, 32768),
    ("8×H200", "data=1,expert=2,tensor=4", "h200", 8, 16384),
    ("16×H200", "data=1,expert=16,tensor=1", "h200", 128, 32768),
]


def report(args) -> list[str]:
    parts = args.parts.split(",")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.machine()) if os.path.exists("/proc/cpuinfo") else platform.machine()
    out = ["# Sharding benchmarks", "",
           f"Command: `python scripts/bench_sharding.py --runs {args.runs} --parts {args.parts}`", "",
           f"Machine: {cpu}, {os.cpu_count()} cores, {len(jax.devices())} fake CPU devices, jax {jax.__version__}, "
           f"python {sys.version.split()[0]}; load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
           "at the start. Fake devices share the cores and their collectives are memory copies: the timings "
           f"compare work, not interconnects. Medians of {args.runs} interleaved runs.", ""]
    if "moe" in parts:
        out += ["## One MoE layer: expert-parallel strategies (64 experts, top-8, bf16, tokens split over expert=8)",
                "", "| tokens | strategy | median ms | rel. diff vs psum |", "|---:|---|---:|---:|"]
        out += [f"| {r['tokens']} | {r['strategy']} | {r['ms']:.1f} | {r['rel_diff_vs_psum']:.1e} |"
                for r in bench.bench_moe(args.runs)]
        out.append("")
    if "model" in parts:
        out += ["## Whole model: EP vs replicated experts (mid-size config `sharding.bench.BENCH`, bf16)", "",
                "Forward: 8 sequences × 64 tokens (prefill step, expanded MLA); decode: 8 × 1 token against a "
                "256-slot cache (absorbed MLA).", "",
                "| layout | mesh (rules) | forward ms | decode step ms |", "|---|---|---:|---:|"]
        out += [f"| {r['layout']} | {r['mesh']} ({r['rules']}) | {r['forward_ms']:.1f} | {r['decode_ms']:.1f} |"
                for r in bench.bench_model(args.runs)]
        out.append("")
    if "planner" in parts:
        big = ["--config", args.config, "--mesh", "data=1,expert=64,tensor=4", "--batch", "64", "--context",
               "32768", "--rules", "dp_attention"]
        r, wall = bench.run_planner(big)
        out += ["## Planner on the full Kimi-K2 config", "",
                f"`python -m kimi_jax.plan {' '.join(big)}` (256 virtual devices): {wall:.1f} s wall, peak RSS "
                f"{r['host_peak_rss'] / GiB:.2f} GiB; lowering and compiling both steps {r['compile_seconds']:.1f} s.",
                "", "Per-device GiB for the recommended meshes (`--rules dp_attention`; temporaries are CPU-compiled, "
                "indicative only):", "",
                "| setup | mesh | batch × context | weights | KV cache | temp | total | HBM | fits |",
                "|---|---|---|---:|---:|---:|---:|---:|---|"]
        for name, mesh, hw, batch, context in RECOMMENDED:
            r, _ = bench.run_planner(["--config", args.config, "--mesh", mesh, "--batch", str(batch), "--context",
                                      str(context), "--hardware", hw, "--rules", "dp_attention"])
            b = {k: v / GiB for k, v in r["per_device_bytes"].items()}
            out.append(f"| {name} | {mesh} | {batch} × {context} | {b['weights']:.1f} | {b['kv_cache']:.1f} | "
                       f"{b['temp']:.1f} | {b['total']:.1f} | {r['hbm_bytes'] / GiB:.0f} | "
                       f"{'yes' if r['fits'] else 'no'} |")
        out += ["", "Each row: `python -m kimi_jax.plan --config CONFIG --mesh MESH --batch B --context T "
                "--hardware HW --rules dp_attention`."]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=7, help="timed runs per case (medians reported)")
    p.add_argument("--parts", default="moe,model,planner")
    p.add_argument("--config", default=KIMI, help="Kimi-K2 config.json for the planner part")
    p.add_argument("--out", help="write the markdown here instead of printing it")
    args = p.parse_args(argv)
    text = "\n".join(report(args)) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
