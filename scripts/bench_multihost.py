"""Decode step time serving from 1 process with 8 CPU devices against 2 processes with 4 each (the
multi-host protocol, runtime/lockstep.py, on one machine): same mesh, model and requests.

    python scripts/bench_multihost.py [--mesh expert=4,tensor=2] [--clients 4] [--max-tokens 64] [--rounds 5]

See kimi_jax/bench/multihost.py for what is measured; paste the table into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_jax.bench.multihost import compare, markdown  # noqa: E402
from kimi_jax.runtime.default_model import default_checkpoint  # noqa: E402
from kimi_jax.text.tokenizer import load_tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mesh", default="expert=4,tensor=2")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    serve = ["--mesh", args.mesh, "--max-batch", str(args.clients), "--max-context", "256"]
    stops = load_tokenizer(default_checkpoint()).stop_ids
    with tempfile.TemporaryDirectory() as logs:
        results = compare(serve, 8, 2, Path(logs), "kimi-k2-instruct", stops, clients=args.clients,
                          max_tokens=args.max_tokens, rounds=args.rounds)
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; mesh {args.mesh}; "
          f"{args.clients} clients x {args.max_tokens} tokens, {args.rounds} rounds\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
