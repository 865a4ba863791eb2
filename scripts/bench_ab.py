"""Time two checkouts of kimi_jax side by side (prefill, decode at batch 1 and 8 on the bench config).

    python scripts/bench_ab.py OLD_TREE NEW_TREE [--rounds 3]

Each round runs a fresh process per checkout, alternating, on the bench checkpoint that
`scripts/bench.py` caches (run it once first). Prints a markdown table of medians.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_jax.bench import ab  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", type=Path, help="checkout timed first in each round (e.g. a `git worktree` of main)")
    p.add_argument("new", type=Path, help="checkout timed second")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--checkpoint", type=Path, default=Path.home() / ".cache" / "kimi_jax" / "bench" / "bench")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    result = ab.run({"old": args.old.resolve(), "new": args.new.resolve()}, args.checkpoint, args.rounds,
                    log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(result) if args.json else ab.markdown(result))


if __name__ == "__main__":
    main()
