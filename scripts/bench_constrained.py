"""Decode throughput of a batch with one constrained (JSON Schema) stream against the same batch all free.

    python scripts/bench_constrained.py                        # the embedded model, 16 streams, 1 constrained
    python scripts/bench_constrained.py --checkpoint DIR --streams 16 --max-new 256 --rounds 3
    python scripts/bench_constrained.py --callback-only        # the mask callback's own cost per step
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_jax.bench import constrained  # noqa: E402
from kimi_jax.bench.generation import machine  # noqa: E402
from kimi_jax.runtime.default_model import load_checkpoint_or_default  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the embedded model)")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--constrained", type=int, default=1)
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--callback-only", action="store_true",
                   help="time only the per-step mask callback (a mask source that allows everything)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    log = lambda m: print(f"[constrained {time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)  # noqa: E731
    model = load_checkpoint_or_default(args.checkpoint)
    if args.callback_only:
        r = constrained.callback_cost(model, args.streams)
        print(json.dumps(r) if args.json else
              f"{r['streams']} rows, {r['steps_per_call']} steps a call, medians of {r['timed_calls']} alternating "
              f"calls: {r['ms_per_step']['free']:.2f} ms a step free, {r['ms_per_step']['masked']:.2f} with the "
              f"callback: +{r['added_ms']:.2f} ms")
        return
    result = constrained.run(model, args.streams, args.constrained, args.max_new, args.rounds, log=log)
    command = "python scripts/bench_constrained.py " + " ".join(sys.argv[1:])
    print(json.dumps(result) if args.json else constrained.markdown(result, command.strip(), machine()))


if __name__ == "__main__":
    main()
