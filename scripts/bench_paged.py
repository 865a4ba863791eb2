"""Serving over the paged cache: the warm-up, capacity, prefix caching in the model card's tool loop, and the
inter-token latency of running streams while a long prompt is admitted (chunked prefill), and in process one
decode call and prefill chunk (calls) and a prefix hit's logits against a whole prefill's (hits).

    python scripts/bench_paged.py                      # every scenario, embedded default model
    python scripts/bench_paged.py --only itl -- --dtype bfloat16   # flags after -- go to every server

See kimi_jax/bench/paged.py for what is measured; results go to BENCHMARKS.md ("Paged cache").
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

from kimi_jax.bench import paged


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["capacity", "prefix", "itl", "calls", "warmup", "hits"], action="append",
                   help="run only these scenarios (repeatable; default all)")
    p.add_argument("--chunks", default="128,256,512,4096", metavar="N,N,...",
                   help="the --prefill-chunk values the itl scenario runs (default 128,256,512,4096)")
    p.add_argument("server_flags", nargs="*", help="flags for every server (after --)")
    args = p.parse_args()
    only = args.only or ["warmup", "capacity", "prefix", "itl", "calls", "hits"]
    flags = args.server_flags
    print(f"# {' '.join(['python', *sys.argv])} on {platform.node()} ({platform.processor() or platform.machine()})")
    if "warmup" in only:
        print("| start | launch -> ready s | warm-up s | programs built | compiled after ready |")
        print("|---|---|---|---|---|")
        for r in paged.warm_up(flags):
            print(f"| {r['start']} | {r['ready_s']} | {r['warm_up_s']} | {r['warm_up_programs']} "
                  f"| {r['compiled_after_ready']} |", flush=True)
        print()
    if "capacity" in only:
        print("| requests at once | positions each | KV positions | most running at once | preemptions | wall s |")
        print("|---|---|---|---|---|---|")
        for clients in (32, 64):
            r = paged.capacity(flags, clients)
            print(f"| {r['clients']} | {r['positions_each']} | {r['kv_positions']} | {r['max_concurrent']} "
                  f"| {r['preemptions']} | {r['wall_s']} |", flush=True)
    if "prefix" in only:
        print("\n| prefix cache | TTFT per turn (ms) | worst later turn ÷ turn 1 | hit rate |")
        print("|---|---|---|---|")
        replies = {}
        for name, extra in (("on", []), ("off", ["--no-prefix-cache"])):
            r = paged.prefix(flags + extra)
            replies[name] = r["replies"]
            print(f"| {name} | {', '.join(map(str, r['ttft_ms']))} | {r['later_over_first']} | {r['hit_rate']} |",
                  flush=True)
        same = sum(a == b for a, b in zip(replies["on"], replies["off"]))
        print(f"\nGreedy replies with the prefix cache equal to those without it: {same} of {len(replies['off'])} "
              "turns (3 conversations)")
    if "calls" in only:
        print("\n| one call (embedded model, fp32) | ms |")
        print("|---|---|")
        for name, ms in paged.calls().items():
            print(f"| {name} | {ms} |", flush=True)
    if "hits" in only:
        from kimi_jax.runtime.default_model import default_checkpoint, load, random_checkpoint

        print("\n| model | dtype | prefix hit vs whole prefill: max logit difference ÷ max logit "
              "| greedy token differs |")
        print("|---|---|---|---|")
        for name, checkpoint in (("embedded", default_checkpoint()), ("random (TINY_KIMI)", random_checkpoint())):
            for dtype in ("float32", "bfloat16"):
                r = paged.hit_logits(load(checkpoint, dtype=dtype))
                print(f"| {name} | {dtype} | {r['max_rel']} | {r['argmax_differs']} of {r['trials']} |", flush=True)
    if "itl" in only:
        print("\n| --prefill-chunk | median ITL without it, same lengths (ms) | p99 ITL while admitting (ms) | ratio "
              "| median ITL before it (ms) | p99 ÷ that | gaps during / matched | admission ms | worst gap ms |")
        print("|---|---|---|---|---|---|---|---|---|")
        for chunk in (int(c) for c in args.chunks.split(",")):
            r = paged.itl(flags + ["--prefill-chunk", str(chunk)])
            print(f"| {chunk} | {r['median_itl_ms']} | {r['p99_itl_admitting_ms']} | **{r['ratio']}** "
                  f"| {r['median_before_ms']} | {r['ratio_to_before']} | {r['gaps_during']} / {r['gaps_matched']} "
                  f"| {r['admission_ms']} | {r['worst_gap_ms']} |", flush=True)
            print(json.dumps(r), file=sys.stderr)


if __name__ == "__main__":
    main()
