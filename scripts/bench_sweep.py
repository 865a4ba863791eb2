"""CPU decode step time over routed experts × batch (kimi_jax.bench.sweep): ms/step, bytes/step, GB/s.

    python scripts/bench_sweep.py                          # experts 16 64 128 384 × batch 1..64
    python scripts/bench_sweep.py --experts 64 --batches 1 8
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_jax.bench import sweep  # noqa: E402
from kimi_jax.bench.generation import machine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, nargs="+", default=list(sweep.EXPERTS))
    p.add_argument("--batches", type=int, nargs="+", default=list(sweep.BATCHES))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    log = lambda m: print(f"[sweep {time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)  # noqa: E731
    rows = sweep.run(args.experts, args.batches, reps=args.reps, log=log)
    command = "python scripts/bench_sweep.py " + " ".join(sys.argv[1:])
    print(json.dumps(rows) if args.json else sweep.markdown(rows, command.strip(), machine()))


if __name__ == "__main__":
    main()
