"""`python -m kimi_jax.plan`: will a config fit a mesh, and what does a step cost? Compiled from abstract weights.

    python -m kimi_jax.plan --config config.json --target v5p-64 --mesh data=1,expert=16,tensor=4 \\
        --batch 64 --context 8192 [--rules dp_attention] [--json]
    python -m kimi_jax.plan --config config.json --mesh expert=8 --batch 8 --context 16384 --hardware h200

The planning itself is `kimi_jax.runtime.plan`; this module is its command line. JAX is imported
only after the mesh is checked, so that the virtual device count can still be set.
"""

from __future__ import annotations

import argparse
import json
import sys

from kimi_jax.config import get_config
from kimi_jax.runtime import flags
from kimi_jax.runtime.plan import HARDWARE, PREFILL_TOKENS, plan, use_cpu_devices
from kimi_jax.runtime.targets import TargetError, known_targets, parse_target
from sharding import MeshError, check, mesh_size


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kimi_jax.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config.json (file or checkpoint directory) or a preset name")
    p.add_argument("--mesh", required=True, help="mesh sizes, e.g. data=1,expert=64,tensor=4")
    p.add_argument("--batch", type=flags.integer(1), required=True, help="decode batch (sequences)")
    p.add_argument("--context", type=flags.integer(1), required=True, help="KV-cache length per sequence (tokens)")
    p.add_argument("--target", default="cpu", metavar="T",
                   help="what to compile for: cpu (virtual CPU devices, default) or a TPU slice, compiled by "
                        f"the TPU compiler without a TPU: {', '.join(t for t in known_targets() if t != 'cpu')}")
    p.add_argument("--hardware", choices=sorted(HARDWARE),
                   help="the chip to judge memory and the roofline against (default: the target's chip)")
    p.add_argument("--no-cost", action="store_true", help="skip the per-step cost accounting (fewer compiles)")
    p.add_argument("--rules", default="default", help="rules table: default, dp_attention or replicated_experts")
    p.add_argument("--prefill-batch", type=flags.integer(1),
                   help="sequences per prefill step (default: one per batch shard)")
    p.add_argument("--prefill-chunk", type=flags.integer(1),
                   help=f"tokens per sequence per prefill step (default: {PREFILL_TOKENS} per expert group)")
    p.add_argument("--kv-cache-gib", type=flags.real(0, open_lo=True), metavar="G",
                   help="a paged KV pool of G GiB per device (what `serve --kv-pages` allocates): counted instead "
                        "of batch × context, and the sequences of --context tokens it holds are reported (default: "
                        "with a chip, the pool its HBM leaves)")
    p.add_argument("--page-size", type=flags.integer(1), default=64, metavar="N", help="positions per KV page (64)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    try:
        cfg = get_config(args.config)
        target = parse_target(args.target)
        check(cfg, args.mesh, args.rules)  # before any device exists: a clear error, not a crash
        # A TPU target is compiled without a TPU: JAX itself runs on one CPU device.
        use_cpu_devices(mesh_size(args.mesh) if target.platform == "cpu" else 1, cpu_target=target.platform == "cpu")
        result = plan(cfg, args.mesh, args.batch, args.context, args.hardware, args.rules, args.prefill_batch,
                      args.prefill_chunk, target=args.target, cost=not args.no_cost,
                      kv_pool=None if args.kv_cache_gib is None else int(args.kv_cache_gib * 1024 ** 3),
                      page_size=args.page_size)
    except (MeshError, TargetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json()) if args.json else result.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
