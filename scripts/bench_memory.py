"""Peak forward memory vs fp8 weight bytes, native (uint8 on CPU) vs float8 storage, side by side.

    python scripts/bench_memory.py [--dir /tmp/kimi-bench-memory] [--tokens 64]
"""

import argparse
import json
import os
import platform
from pathlib import Path

from kimi_jax.bench.memory import MEMORY_BENCH, measure, write_checkpoint


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/kimi-bench-memory", help="where the synthetic checkpoint is written")
    ap.add_argument("--tokens", type=int, default=64, help="prompt length of the measured forward")
    args = ap.parse_args()
    path = write_checkpoint(MEMORY_BENCH, Path(args.dir))
    rows = measure(path, tokens=args.tokens)
    print(json.dumps({"machine": f"{platform.machine()} {os.cpu_count()} cores", "config": MEMORY_BENCH.name,
                      "results": rows}, indent=2))


if __name__ == "__main__":
    main()
