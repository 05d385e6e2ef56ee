"""TODO docstring (prune)."""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError
from ..transforms.prune import prune

USAGE = __doc__.split("\n\n")[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsparse_jax.prune", description=__doc__.split("\n\n")[0],
                                usage=USAGE.replace("``", ""))
    p.add_argument("--method", required=True, choices=["magnitude", "wanda", "sparsegpt"])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="training checkpoint directory (or one step of it)")
    src.add_argument("--hf", help="HF model directory (llama / mistral / qwen2 / bitnet)")
    p.add_argument("--out", required=True, help="output directory: OUT/checkpoints/0 + OUT/config.yaml")
    p.add_argument("--calib_batches", "--calib-batches", type=int, default=16, help="calibration batches (wanda, sparsegpt)")
    p.add_argument("--n", type=int, default=2, help="weights kept per group (default 2)")
    p.add_argument("--m", type=int, default=4, help="group size along the input axis (default 4)")
    p.add_argument("--blocksize", type=int, default=None,
                   help="SparseGPT column block, a multiple of --m (default: the largest one <= 128)")
    p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT damping, a fraction of mean diag(H)")
    p.add_argument("--eval_batches", "--eval-batches", type=int, default=0, help="also print the validation loss before and after")
    p.add_argument("--config", help="YAML whose data section gives the calibration data (default: the checkpoint's)")
    p.add_argument("--seq_len", type=int, help="calibration sequence length (default: the data config's)")
    p.add_argument("overrides", nargs="*", help="dotted data.* overrides, e.g. data.source=/data/corpus data.batch_size=8")
    args = p.parse_args(argv)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        s = prune(args.method, args.out, ckpt=args.ckpt, hf=args.hf, calib_batches=args.calib_batches, n=args.n,
                  m=args.m, blocksize=args.blocksize, percdamp=args.percdamp, eval_batches=args.eval_batches,
                  config=args.config, seq_len=args.seq_len, overrides=args.overrides)
    except ConfigError as e:  # DataError, HFError, CheckpointError are ConfigErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 2
    parts = [f"{k} {v:.4f}" for k, v in s.items() if k in ("val_loss_before", "val_loss_after", "mean_rel_err")]
    print(f"{s['method']} {s['n']}:{s['m']}" + (": " + ", ".join(parts) if parts else ""))
    print(f"wrote {s['out']}")
    return 0

