"""TODO docstring (eval)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from ..checkpoints.source import load
from ..config import SparsityConfig
from ..errors import ConfigError
from ..infer.evaluate import (
    GROUPS,
    Scorer,
    make_batches,
    mc_metrics,
    mc_requests,
    ppl_requests,
    read_documents,
    read_mc,
)
from ..infer.variants import sparsity_config, variant


def main(argv=None) -> int:

    p = argparse.ArgumentParser(prog="python -m qsparse_jax.eval", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="HF model directory (llama / mistral / qwen2 / bitnet)")
    src.add_argument("--ckpt", help="training checkpoint directory (or one step of it)")
    p.add_argument("--ppl", help="text or JSONL file for perplexity")
    p.add_argument("--mc", help="JSONL of {context, choices, label[, target_delimiter]} items")
    p.add_argument("--sparsity", type=float, default=None,
                   help="top-K sparsity of every projection for the sparse column (default: the model's own; "
                        "none for a dense model: dense column only)")
    p.add_argument("--block-size", type=int, default=None, help="Block Q-Sparse N:M block size")
    p.add_argument("--kernels", default="off", help="1.58-bit models: the packed int8 x ternary kernels (on/off)")
    p.add_argument("--seq-len", type=int, default=None, help="max tokens per window (default: the model's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json (default: the model's)")
    p.add_argument("--stats", action="store_true", help="also print a 'stats: {json}' line per column "
                                                        "(compiles, buckets, seconds)")
    args = p.parse_args(argv)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        if not (args.ppl or args.mc):
            raise ConfigError("give --ppl FILE and/or --mc FILE")
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
        mc_items = read_mc(args.mc) if args.mc else None  # read the data first: its errors come fast
        docs = read_documents(args.ppl) if args.ppl else None
        ld = load(hf=args.hf, ckpt=args.ckpt, tokenizer=args.tokenizer)
        model, tok = ld.model, ld.tokenizer
        max_len = min(args.seq_len or model.config.max_seq_len, model.config.max_seq_len)
        sparse = sparsity_config(args.sparsity, default=model.config.sparsity, block_size=args.block_size)
        model.config.replace(sparsity=sparse)  # validates S and the block size against this model
        columns = {"dense": SparsityConfig()}
        if sparse.enabled:
            columns[f"sparse (S={max(getattr(sparse, g) for g in GROUPS):g}"
                    f"{f', {sparse.block_size}-blocks' if sparse.block_size else ''})"] = sparse
        # tokenize and lay out once; every column scores the same device-resident batches
        if mc_items is not None:
            mc_pairs = mc_requests(tok.encode, mc_items, ld.prefix_id)
            mc_batches = make_batches(mc_pairs, max_len, args.batch_size, ld.mesh)
        if docs is not None:
            ppl_pairs, n_tok, n_bytes = ppl_requests(tok, docs, ld.prefix_id, max_len)
            ppl_batches = make_batches(ppl_pairs, max_len, args.batch_size, ld.mesh)
        rows, stats = {}, []
        for name, sp in columns.items():
            t0 = time.perf_counter()
            scorer = Scorer(*variant(model, sp, args.kernels))
            r = {}
            if docs is not None:
                ll, _ = scorer(ppl_batches, desc=f"{name}: perplexity")
                r["perplexity"] = math.exp(-ll.sum() / n_tok)
                r["bits_per_byte"] = -ll.sum() / (n_bytes * math.log(2))
            if mc_items is not None:
                ll, _ = scorer(mc_batches, desc=f"{name}: multiple choice")
                r.update(mc_metrics(mc_items, ll, [len(c) for _, c in mc_pairs]))
            rows[name] = r
            stats.append({"column": name, "compiles": scorer.compiles, "compile_s": scorer.compile_s,
                          "score_s": time.perf_counter() - t0,
                          "buckets": len(set((mc_batches.widths if mc_items is not None else [])
                                             + (ppl_batches.widths if docs is not None else [])))})
    except ConfigError as e:  # DataError, HFError, CheckpointError are ConfigErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    keys = list(next(iter(rows.values())))
    print(f"{'':<28}" + "".join(f"{k:>15}" for k in keys))
    for name, r in rows.items():
        print(f"{name:<28}" + "".join(f"{r[k]:>15.4f}" for k in keys))
    if args.stats:
        for s in stats:
            print("stats: " + json.dumps(s))
    print(json.dumps(rows))
    return 0

