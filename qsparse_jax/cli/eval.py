"""``qsparse eval``: perplexity and multiple-choice accuracy of one model, dense and sparse side by side.

``qsparse eval (--hf DIR | --ckpt DIR) [--ppl FILE] [--mc FILE.jsonl] [--sparsity S] [--block_size M]``

The same weights are scored dense and, when a sparsity is set (``--sparsity`` or the model's own),
with top-K keeping 1 - S of every projection input (a Block Q-Sparse model keeps its N:M blocks).
``--ppl`` takes text or JSONL (``text`` field), scored in lm-eval's rolling windows; ``--mc`` takes
JSONL lines ``{"context", "choices", "label"[, "target_delimiter"]}``, each choice scored as lm-eval
scores a multiple-choice request (``acc``, ``acc_norm``, ...). Prints a table, then the rows as JSON.
"""

from __future__ import annotations

import json
import sys

from ..checkpoints.source import load
from ..config import KERNELS
from ..infer.evaluate import evaluate, read_documents, read_mc
from ..nn.sharding import data_parallel_size
from .common import (
    Parser,
    add_source_options,
    add_sparsity_options,
    command,
    fail,
    sparsity_options,
    summary,
)


@command()
def main(argv=None) -> int:
    p = Parser(prog="qsparse eval", description=summary(__doc__))
    add_source_options(p)
    p.add_argument("--ppl", help="text or JSONL file for perplexity")
    p.add_argument("--mc", help="JSONL of {context, choices, label[, target_delimiter]} items")
    add_sparsity_options(p, run="the sparse column",
                         default="the model's own; a dense model gets the dense column only")
    p.add_argument("--kernels", default="off", choices=KERNELS,
                   help="1.58-bit models: the packed int8 x ternary kernels (default off)")
    p.add_argument("--seq_len", type=int, default=None, help="max tokens per window (default: the model's max_seq_len)")
    p.add_argument("--batch_size", type=int, default=32, help="rows per batch (default 32)")
    p.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json (default: the model's)")
    p.add_argument("--stats", action="store_true",
                   help="also print a 'stats: {json}' line per column (compiles, buckets, seconds)")
    args = p.parse_args(argv)
    if not (args.ppl or args.mc):
        return fail("give --ppl FILE and/or --mc FILE")
    mc_items = read_mc(args.mc) if args.mc else None  # read the data first: its errors come fast
    docs = read_documents(args.ppl) if args.ppl else None
    if args.batch_size < 1:
        return fail(f"--batch_size must be positive, got {args.batch_size}")
    ld = load(hf=args.hf, ckpt=args.ckpt, tokenizer=args.tokenizer)
    if args.batch_size % (n := data_parallel_size(ld.mesh)):
        print(f"note: --batch_size {args.batch_size} does not divide over the {n} local devices the rows are split "
              f"over: each batch is padded to {-(-args.batch_size // n) * n} rows (multiples of {n} run unpadded)",
              file=sys.stderr, flush=True)
    rows, stats = evaluate(ld, docs=docs, mc_items=mc_items, seq_len=args.seq_len, batch_size=args.batch_size,
                           kernels=args.kernels, **sparsity_options(args))
    keys = list(next(iter(rows.values())))
    print(f"{'':<28}" + "".join(f"{k:>15}" for k in keys))
    for name, r in rows.items():
        print(f"{name:<28}" + "".join(f"{r[k]:>15.4f}" for k in keys))
    if args.stats:
        for s in stats:
            print("stats: " + json.dumps(s))
    print(json.dumps(rows))
    return 0
