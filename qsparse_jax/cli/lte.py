"""``qsparse lte``: turn a dense model into an LTE checkpoint (FFN neurons grouped into experts, routers added).

``qsparse lte convert (--ckpt DIR | --hf DIR) WORKDIR [--expert_size 32] [--mode lte|moefication]
[--top_k K] [--calib_batches 8]``

LTE (Learn-To-be-Efficient) learns which groups of FFN neurons ("experts") each token can skip. The
conversion groups every FFN's neurons by balanced k-means, permutes the weights so each expert is a
contiguous slice (the model's function is unchanged) and adds a router per FFN; ``--mode moefication``
also fits the routers to the dense model on calibration batches (the MoEfication baseline, top-K
experts per token). The result trains with ``qsparse train --init_from WORKDIR/checkpoints``.
"""

from __future__ import annotations

from pathlib import Path

from ..config import LTEConfig
from ..transforms.lte_convert import convert
from .common import Parser, add_source_options, command, summary


@command()
def main(argv=None) -> int:
    p = Parser(prog="qsparse lte", description=summary(__doc__))
    sub = p.add_subparsers(dest="cmd", required=True, metavar="convert")
    c = sub.add_parser("convert", help="dense checkpoint / HF model -> LTE checkpoint (grouped, permuted, routers)",
                       description=summary(__doc__))
    add_source_options(c)
    c.add_argument("workdir", help="output: WORKDIR/checkpoints/0 and WORKDIR/config.yaml")
    c.add_argument("--expert_size", type=int, default=32, help="FFN neurons per expert (default 32)")
    c.add_argument("--mode", choices=("lte", "moefication"), default="lte",
                   help="lte (routers trained with the model, default) or moefication (routers fit to the dense model)")
    c.add_argument("--top_k", type=int, default=None, help="moefication: experts kept per token")
    c.add_argument("--seed", type=int, default=0, help="seed of the k-means grouping (default 0)")
    c.add_argument("--calib_batches", type=int, default=8, help="moefication: calibration batches (default 8)")
    args = p.parse_args(argv)
    lte = LTEConfig(enabled=True, expert_size=args.expert_size, mode=args.mode, top_k=args.top_k)
    summary_ = convert(args.workdir, ckpt=args.ckpt, hf=args.hf, lte=lte, seed=args.seed,
                       calib_batches=args.calib_batches)
    ckpts = Path(args.workdir) / "checkpoints"
    print(f"wrote {ckpts}: {summary_}")
    print(f"train it: qsparse train --config {Path(args.workdir) / 'config.yaml'} --init_from {ckpts} "
          f"--workdir RUN model.lte.eta=...")
    return 0
