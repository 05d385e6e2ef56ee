"""TODO docstring (lte)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import LTEConfig
from ..errors import ConfigError
from ..transforms.lte_convert import convert


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsparse_jax.lte", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="dense checkpoint / HF model -> LTE checkpoint (grouped, permuted, routers)")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt")
    src.add_argument("--hf")
    c.add_argument("workdir")
    c.add_argument("--expert-size", "--expert_size", type=int, default=32)
    c.add_argument("--mode", choices=("lte", "moefication"), default="lte")
    c.add_argument("--top-k", "--top_k", type=int, default=None, help="moefication: experts kept per token")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--calib-batches", "--calib_batches", type=int, default=8)
    args = p.parse_args(argv)
    try:
        lte = LTEConfig(enabled=True, expert_size=args.expert_size, mode=args.mode, top_k=args.top_k)
        summary = convert(args.workdir, ckpt=args.ckpt, hf=args.hf, lte=lte, seed=args.seed,
                          calib_batches=args.calib_batches)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {Path(args.workdir) / 'checkpoints'}: {summary}")
    print(f"train it: python train.py --config {Path(args.workdir) / 'config.yaml'} --init_from "
          f"{Path(args.workdir) / 'checkpoints'} --workdir RUN model.lte.eta=...")
    return 0

