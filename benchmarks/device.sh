#!/usr/bin/env bash
# One prepared call on a lent GPU machine (device tool): install the few wheels its image lacks, print the
# versions, run `qsparse bench all` within a time budget, then the training top-K layer (bf16, the 7B up-projection) with what is left.
# Usage (from the repo root, with .whl/ carried): bash benchmarks/device.sh [BUDGET_S]
# The wheels: grain, array_record, tensorboardX, zstandard, portpicker, more-itertools for cp312 (see
# /work/.library/device/README.md); $OUT is the device tool's folder that comes back.
set -u
budget="${1:-300}"
out="${OUT:-runs/device}"
mkdir -p "$out/bench"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import sys, jax, flax, optax, orbax.checkpoint, grain; print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', orbax.checkpoint.__version__, jax.devices())"
start=$(date +%s)
python3 -m qsparse_jax bench all --out "$out/bench" --budget_s "$budget" 2>&1 | tee "$out/bench.log"
echo "bench all: $(( $(date +%s) - start )) s"
timeout 120 python3 benchmarks/topk_ways.py 2>&1 | tee "$out/topk_ways.log"
left=$(( 150 - ($(date +%s) - start - budget) ))
if [ "$left" -gt 30 ]; then
  timeout "$left" python3 -m qsparse_jax bench topk --tokens 8192 --d_in 4096 --d_out 11008 --dtype bfloat16 2>&1 | tee "$out/topk.log"
fi
