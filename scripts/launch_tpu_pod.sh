#!/usr/bin/env bash
# Run the same kimi_jax command on every host of a TPU VM pod slice.
# jax.distributed.initialize() then reads the topology from the TPU metadata (--tpu-pod).
#
#   scripts/launch_tpu_pod.sh TPU_NAME ZONE [module args...]
#   scripts/launch_tpu_pod.sh kimi-v5p-128 us-east5-a --checkpoint /mnt/ckpt/kimi-k2-orbax \
#       --mesh expert=16,tensor=4 --chat "Hello" --json
#   MODULE=kimi_jax.serve scripts/launch_tpu_pod.sh kimi-v5p-64 us-east5-a --checkpoint /mnt/ckpt/kimi-k2-orbax \
#       --mesh data=1,expert=16,tensor=4 --rules dp_attention --port 8000   # process 0 serves HTTP
#
# Env: PROJECT (gcloud project, default: gcloud's), REPO (the kimi_jax checkout on every host,
# default ~/kimi_jax), PYTHON (default $REPO/.venv/bin/python), MODULE (default kimi_jax.generate).
# The checkpoint path must be the same on every host (a shared disk or a gcsfuse mount).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
TPU=$1 ZONE=$2; shift 2
REPO=${REPO:-'~/kimi_jax'}
PYTHON=${PYTHON:-"$REPO/.venv/bin/python"}
MODULE=${MODULE:-kimi_jax.generate}
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all \
  --command "cd $REPO && $PYTHON -m $MODULE --tpu-pod$args"
