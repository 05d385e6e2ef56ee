#!/usr/bin/env bash
# Delete a TPU VM / pod slice (or its queued resource, --queued), so it stops billing.
#
#   tpu/delete.sh [--dry-run] [--tpu NAME] [--zone ZONE] [--project ID] [--queued] [--yes]
#
# Without --yes it asks first (and refuses when there is no terminal to ask on).
# --dry-run prints every command (one per line, shell-quoted) and runs none.
set -euo pipefail

USAGE="tpu/delete.sh [--dry-run] [--tpu NAME] [--zone ZONE] [--project ID] [--queued] [--yes]"
PROG="tpu/delete.sh"
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

dry_run=0; queued=0; yes=0
tpu="${TPU:-}"; zone="${ZONE:-}"; project="${PROJECT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --tpu) need_value "$1" $#; tpu="$2"; shift 2 ;;
    --zone) need_value "$1" $#; zone="$2"; shift 2 ;;
    --project) need_value "$1" $#; project="$2"; shift 2 ;;
    --queued) queued=1; shift ;;
    --yes|-y) yes=1; shift ;;
    -h|--help) echo "usage: $USAGE"; exit 0 ;;
    *) fail "unknown argument $1; usage: $USAGE" ;;
  esac
done

[ -n "$tpu" ] || fail "no TPU name: pass --tpu NAME or set TPU"
[ -n "$zone" ] || fail "no zone: pass --zone ZONE or set ZONE"

where=("--zone=$zone")
[ -z "$project" ] || where+=("--project=$project")
if [ "$queued" -eq 1 ]; then  # --force also deletes the node it granted
  cmd=(gcloud compute tpus queued-resources delete "$tpu" "${where[@]}" --force --quiet)
else
  cmd=(gcloud compute tpus tpu-vm delete "$tpu" "${where[@]}" --quiet)
fi

if [ "$dry_run" -eq 1 ]; then
  printf '%q' "${cmd[0]}"; printf ' %q' "${cmd[@]:1}"; printf '\n'
  exit 0
fi
if [ "$yes" -eq 0 ]; then
  [ -t 0 ] || fail "refusing to delete $tpu without --yes (no terminal to ask on)"
  read -r -p "delete $([ "$queued" -eq 1 ] && echo "queued resource" || echo "TPU VM") $tpu in $zone? [y/N] " answer
  case "$answer" in y|Y|yes) ;; *) echo "not deleted"; exit 1 ;; esac
fi
exec "${cmd[@]}"
