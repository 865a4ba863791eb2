"""`python -m kimi_jax.plan`: will a config fit a mesh? Per-device memory, compiled from abstract weights.

    python -m kimi_jax.plan --config config.json --mesh data=1,expert=64,tensor=4 \\
        --batch 64 --context 32768 --hardware v5p [--rules dp_attention] [--json]

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
from sharding import MeshError, check, mesh_size


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kimi_jax.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config.json (file or checkpoint directory) or a preset name")
    p.add_argument("--mesh", required=True, help="mesh sizes, e.g. data=1,expert=64,tensor=4")
    p.add_argument("--batch", type=flags.integer(1), required=True, help="decode batch (sequences)")
    p.add_argument("--context", type=flags.integer(1), required=True, help="KV-cache length per sequence (tokens)")
    p.add_argument("--hardware", choices=sorted(HARDWARE), help="say whether it fits this chip's memory")
    p.add_argument("--rules", default="default", help="rules table: default, dp_attention or replicated_experts")
    p.add_argument("--prefill-batch", type=flags.integer(1),
                   help="sequences per prefill step (default: one per batch shard)")
    p.add_argument("--prefill-chunk", type=flags.integer(1),
                   help=f"tokens per sequence per prefill step (default: {PREFILL_TOKENS} per expert group)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    try:
        cfg = get_config(args.config)
        check(cfg, args.mesh, args.rules)  # before any device exists: a clear error, not a crash
        use_cpu_devices(mesh_size(args.mesh))
        result = plan(cfg, args.mesh, args.batch, args.context, args.hardware, args.rules, args.prefill_batch,
                      args.prefill_chunk)
    except (MeshError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json()) if args.json else result.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
