#!/usr/bin/env bash
# Run train.py on every worker of a TPU VM / pod slice: tpu/launch.sh [train.py args...]
# Needs TPU (the TPU VM name) and ZONE; REPO (default: this checkout's origin URL) is cloned on each worker.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
REPO="${REPO:-$(git -C "$(dirname "$0")/.." remote get-url origin)}"
REF="${REF:-$(git -C "$(dirname "$0")/.." rev-parse HEAD)}"
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -e
  if [ ! -d qsparse-jax ]; then git clone -q $REPO qsparse-jax; fi
  cd qsparse-jax && git fetch -q && git checkout -q $REF
  python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]'
  .venv/bin/python train.py --distributed $args
"
