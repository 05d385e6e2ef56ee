#!/usr/bin/env bash
# Create a TPU VM or pod slice: directly (on-demand / spot), or as a queued resource that Cloud TPU
# grants when capacity frees up (the usual way to get v5p / v6e slices).
#
#   tpu/create.sh [--dry-run] [--tpu NAME] [--zone ZONE] [--project ID] --type ACCEL [--version RUNTIME]
#                 [--queued [--wait]] [--spot] [--reserved]
#
# ACCEL: v5p-128, v5litepod-256 (v5e), v6e-64, v4-32, ...; RUNTIME defaults by generation
# (v4: tpu-ubuntu2204-base, v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e).
# --queued asks for a queued resource named NAME (node NAME); --wait then polls until it is ACTIVE.
# --dry-run prints every command (one per line, shell-quoted) and runs none.
set -euo pipefail

USAGE="tpu/create.sh [--dry-run] [--tpu NAME] [--zone ZONE] [--project ID] --type ACCEL [--version RUNTIME] [--queued [--wait]] [--spot] [--reserved]"
PROG="tpu/create.sh"
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

dry_run=0; queued=0; wait_active=0; spot=0; reserved=0
tpu="${TPU:-}"; zone="${ZONE:-}"; project="${PROJECT:-}"; accel=""; version=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --tpu) need_value "$1" $#; tpu="$2"; shift 2 ;;
    --zone) need_value "$1" $#; zone="$2"; shift 2 ;;
    --project) need_value "$1" $#; project="$2"; shift 2 ;;
    --type) need_value "$1" $#; accel="$2"; shift 2 ;;
    --version) need_value "$1" $#; version="$2"; shift 2 ;;
    --queued) queued=1; shift ;;
    --wait) wait_active=1; shift ;;
    --spot) spot=1; shift ;;
    --reserved) reserved=1; shift ;;
    -h|--help) echo "usage: $USAGE"; exit 0 ;;
    *) fail "unknown argument $1; usage: $USAGE" ;;
  esac
done

[ -n "$tpu" ] || fail "no TPU name: pass --tpu NAME or set TPU"
[ -n "$zone" ] || fail "no zone: pass --zone ZONE or set ZONE"
[ -n "$accel" ] || fail "no accelerator type: pass --type, e.g. v5p-128, v5litepod-256, v6e-64"
[ "$spot" -eq 0 ] || [ "$reserved" -eq 0 ] || fail "--spot and --reserved exclude each other"
[ "$wait_active" -eq 0 ] || [ "$queued" -eq 1 ] || fail "--wait goes with --queued"
if [ -z "$version" ]; then
  case "$accel" in
    v4-*) version="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) fail "unknown accelerator type '$accel' (v4-N, v5p-N, v5litepod-N, v6e-N); or pass --version" ;;
  esac
fi

run() {  # print the command, shell-quoted; run it unless --dry-run
  printf '%q' "$1"; [ $# -lt 2 ] || printf ' %q' "${@:2}"; printf '\n'
  if [ "$dry_run" -eq 0 ]; then "$@"; fi
}

where=("--zone=$zone")
[ -z "$project" ] || where+=("--project=$project")
if [ "$queued" -eq 1 ]; then
  cmd=(gcloud compute tpus queued-resources create "$tpu" --node-id="$tpu" "${where[@]}"
       --accelerator-type="$accel" --runtime-version="$version")
  [ "$spot" -eq 0 ] || cmd+=(--spot)
  [ "$reserved" -eq 0 ] || cmd+=(--reserved)
  run "${cmd[@]}"
  if [ "$wait_active" -eq 1 ]; then
    check=(gcloud compute tpus queued-resources describe "$tpu" "${where[@]}" --format=value\(state.state\))
    if [ "$dry_run" -eq 1 ]; then
      echo "# every 60 s until it prints ACTIVE (FAILED / SUSPENDED: stop):"
      run "${check[@]}"
    else
      while true; do
        state="$("${check[@]}")"
        echo "queued resource $tpu: $state"
        case "$state" in
          ACTIVE) break ;;
          FAILED|SUSPENDED) echo "tpu/create.sh: queued resource $tpu is $state" >&2; exit 1 ;;
        esac
        sleep 60
      done
    fi
  fi
else
  cmd=(gcloud compute tpus tpu-vm create "$tpu" "${where[@]}" --accelerator-type="$accel" --version="$version")
  [ "$spot" -eq 0 ] || cmd+=(--spot)
  [ "$reserved" -eq 0 ] || cmd+=(--reserved)
  run "${cmd[@]}"
fi
