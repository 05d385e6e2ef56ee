"""``qsparse prune``: prune every block linear of a model to N:M (default 2:4): magnitude, Wanda or SparseGPT.

``qsparse prune --method magnitude|wanda|sparsegpt (--ckpt DIR | --hf DIR) --out DIR [--calib_batches B]
[--n 2 --m 4] [--eval_batches K] [data.key=value ...]``

Writes ``OUT/checkpoints/0`` (the pruned weights, their zeros in place) and ``OUT/config.yaml`` (the
source's config), so the result trains (``qsparse train --config OUT/config.yaml --init_from
OUT/checkpoints``), evaluates (``qsparse eval --ckpt OUT/checkpoints``) and exports (``qsparse
export-hf``) like any other checkpoint. The embedding and LM head stay dense. Wanda and SparseGPT
calibrate on the first B training batches of the checkpoint's data (``--config``'s, or ``data.*``
overrides on top); ``--eval_batches K`` also prints the validation loss before and after.
"""

from __future__ import annotations

from ..transforms.prune import prune
from .common import Parser, add_source_options, command, summary


@command()
def main(argv=None) -> int:
    p = Parser(prog="qsparse prune", description=summary(__doc__))
    p.add_argument("--method", required=True, choices=["magnitude", "wanda", "sparsegpt"], help="how weights are chosen")
    add_source_options(p)
    p.add_argument("--out", required=True, help="output directory: OUT/checkpoints/0 + OUT/config.yaml")
    p.add_argument("--calib_batches", type=int, default=16, help="calibration batches (wanda, sparsegpt; default 16)")
    p.add_argument("--n", type=int, default=2, help="weights kept per group (default 2)")
    p.add_argument("--m", type=int, default=4, help="group size along the input axis (default 4)")
    p.add_argument("--blocksize", type=int, default=None,
                   help="SparseGPT column block, a multiple of --m (default: the largest one <= 128)")
    p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT damping, a fraction of mean diag(H)")
    p.add_argument("--eval_batches", type=int, default=0, help="also print the validation loss before and after")
    p.add_argument("--config", help="YAML whose data section gives the calibration data (default: the checkpoint's)")
    p.add_argument("--seq_len", type=int, help="calibration sequence length (default: the data config's)")
    p.add_argument("overrides", nargs="*", help="dotted data.* overrides, e.g. data.source=/data/corpus data.batch_size=8")
    args = p.parse_args(argv)
    s = prune(args.method, args.out, ckpt=args.ckpt, hf=args.hf, calib_batches=args.calib_batches, n=args.n,
              m=args.m, blocksize=args.blocksize, percdamp=args.percdamp, eval_batches=args.eval_batches,
              config=args.config, seq_len=args.seq_len, overrides=args.overrides)
    parts = [f"{k} {v:.4f}" for k, v in s.items() if k in ("val_loss_before", "val_loss_after", "mean_rel_err")]
    print(f"{s['method']} {s['n']}:{s['m']}" + (": " + ", ".join(parts) if parts else ""))
    print(f"wrote {s['out']}")
    return 0
