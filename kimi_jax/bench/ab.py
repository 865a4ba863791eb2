"""Two checkouts of kimi_jax side by side: prefill and decode of the bench config, alternating.

A change that should not alter speed is checked by timing the old and the new code in turn, round
by round, on the same cached checkpoint: each round runs one fresh process per checkout (the code
on `PYTHONPATH`), so both see the same machine state, and medians per checkout are compared.
Only the public API and `compare`'s timing functions are used, so an older checkout works too.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, statistics, sys
import kimi_jax
from kimi_jax.bench import compare
model = kimi_jax.load(sys.argv[1], dtype="bfloat16")
s = compare.QUICK
fns = {"prefill_s": compare.kimi_prefill(model, s.prefill_prompt), "decode_b1_s": compare.kimi_decode(model, 1, s),
       "decode_b8_s": compare.kimi_decode(model, 8, s)}
print(json.dumps({k: statistics.median(v) for k, v in compare.interleaved(fns, int(sys.argv[2])).items()}))
"""


def measure(tree: Path, checkpoint: Path, reps: int) -> dict[str, float]:
    """One fresh process on `tree`'s code: median seconds of prefill and decode steps."""
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", CHILD, str(checkpoint), str(reps)], capture_output=True, text=True,
                         env=env, cwd=tree, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(trees: dict[str, Path], checkpoint: Path, rounds: int = 3, reps: int = 5, log=print) -> dict:
    """`rounds` rounds of every tree in turn -> per tree, each figure's runs and their median."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for r in range(rounds):
        for name, tree in trees.items():
            runs[name].append(measure(tree, checkpoint, reps))
            log(f"round {r + 1}/{rounds} {name}: {runs[name][-1]}")
    return {name: {k: {"runs": [x[k] for x in rs], "median": statistics.median(x[k] for x in rs)} for k in rs[0]}
            for name, rs in runs.items()}


def markdown(result: dict) -> str:
    names = list(result)
    figures = list(result[names[0]])
    lines = [f"| figure | {' | '.join(names)} | {names[-1]} / {names[0]} |", "|---" * (len(names) + 2) + "|"]
    for k in figures:
        med = [result[n][k]["median"] for n in names]
        cells = " | ".join(f"{m * 1e3:.1f} ms ({', '.join(f'{x * 1e3:.1f}' for x in result[n][k]['runs'])})"
                           for m, n in zip(med, names))
        lines.append(f"| {k[:-2]} | {cells} | {med[-1] / med[0]:.2f} |")
    return "\n".join(lines)
