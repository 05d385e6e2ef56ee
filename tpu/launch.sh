#!/usr/bin/env bash
# Run train.py on every worker of a TPU VM / pod slice, with --distributed (jax.distributed.initialize()
# finds the other hosts itself on Cloud TPU).
#
#   tpu/launch.sh [--dry-run] [--tpu NAME] [--zone ZONE] [--project ID] [--repo URL] [--ref REV]
#                 [--extras LIST] [--] TRAIN_ARGS...
#
# Each worker clones REPO into ~/qsparse-jax (or fetches it), checks out REV, makes .venv with
# `pip install -e .[LIST]` (default LIST: tpu, i.e. libtpu) and runs `train.py --distributed TRAIN_ARGS`.
# --tpu / --zone / --project / --repo / --ref default to $TPU, $ZONE, $PROJECT, this checkout's origin
# URL and its HEAD commit. --dry-run prints every command (one per line, shell-quoted) and runs none.
# TRAIN_ARGS start at `--` or at the first train.py argument (--config, --workdir, key=value, ...).
set -euo pipefail

USAGE="tpu/launch.sh [--dry-run] [--tpu NAME] [--zone ZONE] [--project ID] [--repo URL] [--ref REV] [--extras LIST] [--] TRAIN_ARGS..."
PROG="tpu/launch.sh"
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dry_run=0
tpu="${TPU:-}"; zone="${ZONE:-}"; project="${PROJECT:-}"; repo="${REPO:-}"; ref="${REF:-}"; extras="tpu"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --tpu) need_value "$1" $#; tpu="$2"; shift 2 ;;
    --zone) need_value "$1" $#; zone="$2"; shift 2 ;;
    --project) need_value "$1" $#; project="$2"; shift 2 ;;
    --repo) need_value "$1" $#; repo="$2"; shift 2 ;;
    --ref) need_value "$1" $#; ref="$2"; shift 2 ;;
    --extras) need_value "$1" $#; extras="$2"; shift 2 ;;
    -h|--help) echo "usage: $USAGE"; exit 0 ;;
    --) shift; break ;;
    # train.py's own arguments start TRAIN_ARGS
    --config|--config=*|--workdir|--workdir=*|--init_from|--init_from=*|--init-from|--init-from=*) break ;;
    --compile_only|--compile-only|--topology|--topology=*) break ;;
    --distributed) shift ;;  # always passed
    -*) fail "unknown option $1 (train.py arguments go after --); usage: $USAGE" ;;
    *) break ;;
  esac
done

[ -n "$tpu" ] || fail "no TPU name: pass --tpu NAME or set TPU"
[ -n "$zone" ] || fail "no zone: pass --zone ZONE or set ZONE"
if [ -z "$repo" ]; then
  repo="$(git -C "$here/.." remote get-url origin 2>/dev/null)" || fail "no --repo URL and this checkout has no origin remote"
fi
if [ -z "$ref" ]; then
  ref="$(git -C "$here/.." rev-parse HEAD 2>/dev/null)" || fail "no --ref and this checkout has no commit"
fi
[ $# -gt 0 ] || fail "no train.py arguments (e.g. -- --config configs/700m-qsparse.yaml --workdir gs://BUCKET/runs/x)"
case "$extras" in *[!a-z0-9,_-]*) fail "--extras takes a comma-separated list of extras, got '$extras'" ;; esac

pip_target=".[${extras}]"
[ -n "$extras" ] || pip_target="."
train_args=$(printf ' %q' "$@")
# what every worker runs (bash -c on the worker)
remote="set -euo pipefail
if [ ! -d qsparse-jax ]; then git clone -q $(printf '%q' "$repo") qsparse-jax; fi
cd qsparse-jax && git fetch -q origin && git checkout -q $(printf '%q' "$ref")
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/pip install -q -e $(printf '%q' "$pip_target")
exec .venv/bin/python train.py --distributed${train_args}"

cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone")
[ -z "$project" ] || cmd+=("--project=$project")
cmd+=(--worker=all "--command=$remote")

if [ "$dry_run" -eq 1 ]; then  # a valid shell script: the worker's commands as comments, then the one command run here
  echo "# on every worker of $tpu, in bash:"
  while IFS= read -r line; do echo "#   $line"; done <<<"$remote"
  printf '%q' "${cmd[0]}"; printf ' %q' "${cmd[@]:1}"; printf '\n'
  exit 0
fi
exec "${cmd[@]}"
