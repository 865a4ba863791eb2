"""The README's recommended-mesh tables, from the planner: TPU rows compiled by the TPU compiler itself.

    .venv/bin/python scripts/bench_plans.py [--only fp8|int4] [--no-cost] [--out plans.md]

Each row is one `python -m kimi_jax.plan ... --json` in a child process (one at a time: a full
Kimi-K2 plan with cost compiles six programs, minutes each on a 2-core host). TPU rows use
`--target` (libtpu's deviceless compiler: real temporaries, the TPU kernels, the compiler's cost
analysis); GPU rows are CPU-compiled estimates measured against the chip's HBM (`--hardware`).
Prints (or writes) markdown with the command of every row.
"""

from __future__ import annotations

import argparse
import sys
import time

from kimi_jax.bench import sharding as bench
from kimi_jax.bench.generation import machine

KIMI = "../shared/reference/kimi-k2-instruct/config.json"
GiB = 1024 ** 3

# (setup, config, target, hardware, mesh, batch, context); dp_attention rules throughout.
FP8_ROWS = [
    ("TPU v5e-256", KIMI, "v5e-256", None, "data=1,expert=32,tensor=8", 64, 16384),
    ("TPU v5p-64", KIMI, "v5p-64", None, "data=1,expert=16,tensor=4", 128, 32768),
    ("TPU v6e-64", KIMI, "v6e-64", None, "data=1,expert=8,tensor=8", 32, 16384),
    ("TPU v6e-128", KIMI, "v6e-128", None, "data=1,expert=16,tensor=8", 64, 32768),
    ("8×H200", KIMI, "cpu", "h200", "data=1,expert=2,tensor=4", 8, 16384),
    ("16×H200", KIMI, "cpu", "h200", "data=1,expert=16,tensor=1", 128, 32768),
]
INT4_ROWS = [
    ("8×H200", "kimi-k2-thinking", "cpu", "h200", "data=1,expert=2,tensor=4", 16, 32768),
    ("TPU v5p-32", "kimi-k2-thinking", "v5p-32", None, "data=1,expert=8,tensor=4", 64, 32768),
    ("TPU v6e-64", "kimi-k2-thinking", "v6e-64", None, "data=1,expert=8,tensor=8", 32, 16384),
]


def row_args(config, target, hardware, mesh, batch, context, cost: bool) -> list[str]:
    """The planner's arguments for a row; a CPU-compiled (GPU) row plans memory only: its costs would be
    the CPU compiler's, which say nothing about a GPU."""
    args = ["--config", config, "--target", target, "--mesh", mesh, "--batch", str(batch), "--context", str(context),
            "--rules", "dp_attention"]
    return args + (["--hardware", hardware] if hardware else []) + ([] if cost and target != "cpu" else ["--no-cost"])


def table(rows, cost: bool) -> list[str]:
    head = "| setup | target | mesh | batch × context | weights | KV cache | temp | total | HBM | fits |"
    rule = "|---|---|---|---|---:|---:|---:|---:|---:|---|"
    if cost:
        head += " decode read ÷ must read | roofline ms | tokens/s ceiling |"
        rule += "---:|---:|---:|"
    out, commands = [head, rule], []
    for setup, config, target, hardware, mesh, batch, context in rows:
        args = row_args(config, target, hardware, mesh, batch, context, cost)
        start = time.perf_counter()
        r, _ = bench.run_planner(args)
        b = {k: v / GiB for k, v in r["per_device_bytes"].items()}
        line = (f"| {setup} | {target if target != 'cpu' else 'cpu (estimate)'} | {mesh} | {batch} × {context} | "
                f"{b['weights']:.1f} | {b['kv_cache']:.1f} | {b['temp']:.1f} | {b['total']:.1f} | "
                f"{r['hbm_bytes'] / GiB:.0f} | {'yes' if r['fits'] else 'no'} |")
        if cost and r.get("decode"):
            d = r["decode"]
            line += f" {d['ratio']:.2f} | {d['roofline_ms']:.2f} | {d['tokens_per_s_ceiling']:.0f} |"
        elif cost:
            line += " — | — | — |"
        out.append(line)
        commands.append(f"- {setup}: `python -m kimi_jax.plan {' '.join(args)}` "
                        f"({time.perf_counter() - start:.0f} s)")
        print(line, file=sys.stderr, flush=True)  # progress: a full table takes a while
    return out + ["", *commands]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("fp8", "int4"), help="one table only")
    p.add_argument("--no-cost", action="store_true", help="memory only (two compiles per row, no ratio)")
    p.add_argument("--out", help="write the markdown here instead of printing it")
    args = p.parse_args(argv)
    out = [f"Machine: {machine()}. Per-device GiB; `dp_attention` rules.", ""]
    if args.only in (None, "fp8"):
        out += ["Kimi-K2-Instruct (block-fp8):", "", *table(FP8_ROWS, not args.no_cost), ""]
    if args.only in (None, "int4"):
        out += ["Kimi-K2-Thinking (INT4 routed experts, the rest bf16):", "", *table(INT4_ROWS, not args.no_cost), ""]
    text = "\n".join(out) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
