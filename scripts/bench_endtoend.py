"""End-to-end generation against transformers on CPU: a 64-token prompt + 32 new tokens, batch 1 and
8, the bench config with 64 and 128 routed experts, and prefill (kimi_jax/bench/endtoend.py).

    python scripts/bench_endtoend.py                 # ~10 min on 2 cores; results go to BENCHMARKS.md
    python scripts/bench_endtoend.py --experts 64 --reps 3
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_jax.bench import endtoend  # noqa: E402
from kimi_jax.bench.compare import TINY  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", default="64,128", help="routed-expert counts, comma-separated (default 64,128)")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (medians reported)")
    p.add_argument("--tiny", action="store_true", help="the tiny config, 1 rep, short replies: a smoke run")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "kimi_jax" / "bench"),
                   help="where the random checkpoints are written once and reused")
    args = p.parse_args()
    experts = tuple(int(e) for e in args.experts.split(","))
    s = endtoend.Settings(experts=experts, reps=args.reps)
    if args.tiny:
        s = endtoend.Settings(base=TINY, experts=(16,), batches=(1, 2), prompt=8, new=4, prefill_prompt=16, reps=1)
    rows = endtoend.run(s, Path(args.cache_dir), log=lambda m: print(m, file=sys.stderr, flush=True))
    print(endtoend.markdown(rows, s, " ".join(["python", *sys.argv])))


if __name__ == "__main__":
    main()
