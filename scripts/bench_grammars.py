"""Grammar libraries side by side (kimi_jax.bench.grammars): schema compile time and mask time per token.

    pip install xgrammar outlines-core      # not kimi_jax dependencies; llguidance is
    python scripts/bench_grammars.py
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_jax.bench import grammars  # noqa: E402
from kimi_jax.bench.generation import machine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    log = lambda m: print(f"[grammars {time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)  # noqa: E731
    rows = grammars.run(log=log)
    print(json.dumps(rows) if args.json else grammars.markdown(rows, "python scripts/bench_grammars.py", machine()))


if __name__ == "__main__":
    main()
