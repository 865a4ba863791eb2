"""`make bench`: kimi_jax against transformers and against the memory-bandwidth roofline.

    python scripts/bench.py                  # the "bench" config, full repetitions
    python scripts/bench.py --quick --json   # < 10 min; one JSON object on stdout
    python scripts/bench.py --config tiny    # seconds: a smoke run (tests/test_bench.py)
    python scripts/bench.py --gpu            # Kimi-K2-width layers on one GPU (see scripts/bench_gpu.sh)
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_jax.bench import compare, gpu  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="bench", choices=["bench", "tiny"])
    p.add_argument("--quick", action="store_true", help="fewer decode steps and TTFT repetitions (< 10 min)")
    p.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "kimi_jax" / "bench"),
                   help="where the random checkpoints are written once and reused")
    p.add_argument("--no-ttft", action="store_true", help="skip the fresh-process time-to-first-token runs")
    p.add_argument("--no-profile", action="store_true", help="skip the ablation profile of one decode step")
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--gpu", action="store_true", help="run the GPU benchmark (kimi_jax.bench.gpu) instead")
    args = p.parse_args()

    def log(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr if args.json else sys.stdout, flush=True)

    if args.gpu:
        result = gpu.run(args.config if args.config == "tiny" else "k2-width", log=log)
        print(json.dumps(result) if args.json else gpu.markdown(result))
        return

    settings = compare.SMOKE if args.config == "tiny" else compare.QUICK if args.quick else compare.FULL
    start = time.perf_counter()
    result = compare.run(args.config, settings, Path(args.cache_dir), with_ttft=not args.no_ttft,
                         with_profile=not args.no_profile and args.config != "tiny", log=log)
    result["wall_s"] = time.perf_counter() - start
    command = "python scripts/bench.py " + " ".join(sys.argv[1:])
    table = compare.markdown(result, command.strip())
    if args.out:
        Path(args.out).write_text(table)
    print(json.dumps(result) if args.json else table)


if __name__ == "__main__":
    main()
