"""Generation benchmark: decode tokens/s at batch 1 and 8, time to first token (cold/warm compile
cache), KV-cache bytes per token per layer, on the random-weight TINY_KIMI checkpoint
(`default_model.random_checkpoint`) and a larger CPU bench config.

    python scripts/bench_generate.py --out /tmp/generation_bench.md
"""

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_jax.bench import generation as bench  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="repetitions per figure (medians reported)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--only", choices=("tiny", "bench"), help="run one model only")
    p.add_argument("--bench-dir", help="where to write the bench checkpoint (default: a temporary directory)")
    p.add_argument("--out", help="write the markdown report here (default: print it)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        if args.only in (None, "tiny"):
            models["TINY_KIMI, random weights"] = None
        if args.only in (None, "bench"):
            models["CPU bench config"] = bench.write_bench_checkpoint(Path(args.bench_dir or tmp))
        results = bench.run_all(models, args.dtype, args.reps, args.new_tokens)
    print(json.dumps(results, indent=1), file=sys.stderr)
    report = bench.markdown(results, "python " + shlex.join(sys.argv), args.dtype)
    if args.out:
        Path(args.out).write_text(report)
    else:
        print(report)


if __name__ == "__main__":
    main()
