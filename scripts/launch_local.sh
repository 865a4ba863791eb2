#!/usr/bin/env bash
# N processes on this machine, K CPU devices each, joined over 127.0.0.1 (gloo collectives):
# the multi-host code path, testable on one box. Process 0's stdout is this script's stdout.
#
#   scripts/launch_local.sh N K [module args...]
#   scripts/launch_local.sh 2 4 --checkpoint /ckpt/tiny-orbax --mesh expert=4,tensor=2 \
#       --prompt-ids "1 2 3" --temperature 0 --json
#   MODULE=kimi_jax.serve scripts/launch_local.sh 2 4 --mesh expert=4,tensor=2 --port 8000
#
# Env: PYTHON (default .venv/bin/python, else python3), MODULE (default kimi_jax.generate),
# PORT (coordinator port, default 29500 + a random offset), KIMI_INIT_TIMEOUT (default 120 s).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
N=$1 K=$2; shift 2
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
MODULE=${MODULE:-kimi_jax.generate}
PORT=${PORT:-$((29500 + RANDOM % 2000))}
export JAX_PLATFORMS=cpu KIMI_INIT_TIMEOUT=${KIMI_INIT_TIMEOUT:-120}
unset XLA_FLAGS  # a forced host device count would fight --num-cpu-devices

pids=()
for ((i = 0; i < N; i++)); do
  out=/dev/stdout; [[ $i -eq 0 ]] || out=/dev/null  # only process 0 prints anyway
  "$PYTHON" -m "$MODULE" "$@" --coordinator-address "127.0.0.1:$PORT" --num-processes "$N" \
    --process-id "$i" --num-cpu-devices "$K" > "$out" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do
  wait "$pid" || { r=$?; [[ $rc -ne 0 ]] || rc=$r; }
done
exit $rc
