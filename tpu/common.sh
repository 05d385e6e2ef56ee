# Helpers shared by tpu/create.sh, tpu/launch.sh and tpu/delete.sh (sourced; set PROG and USAGE first).
# shellcheck shell=bash

fail() {  # a user mistake: one line on stderr, exit 2
  echo "$PROG: $*" >&2
  exit 2
}

need_value() {  # need_value OPTION ARGS_LEFT: the option must be followed by a value
  if [ "$2" -lt 2 ]; then fail "$1 needs a value; usage: $USAGE"; fi
}
