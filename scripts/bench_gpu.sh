#!/usr/bin/env bash
# Kimi-K2-width decode and prefill on one GPU (e.g. one NVIDIA H200) in one go, < 10 minutes, no network:
# needs only JAX with CUDA and this repository. Weights are random, generated on the device.
#   scripts/bench_gpu.sh               # the full-width run; writes bench_gpu.json and bench_gpu.md
#   scripts/bench_gpu.sh --config tiny # the same code path on a tiny config (runs on CPU too)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${OUT:-.}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
"$PY" -c "import jax; print('devices:', jax.devices())"
timeout 590 "$PY" scripts/bench.py --gpu --json "$@" > "$OUT/bench_gpu.json"
"$PY" -c "import json, sys; from kimi_jax.bench.gpu import markdown; print(markdown(json.load(open(sys.argv[1]))))" \
  "$OUT/bench_gpu.json" | tee "$OUT/bench_gpu.md"
