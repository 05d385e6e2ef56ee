"""Evaluation: perplexity and multiple-choice log-likelihood accuracy, dense vs sparse side by side.

``python -m qsparse_jax.eval (--hf DIR | --ckpt DIR) [--ppl FILE] [--mc FILE.jsonl] [--sparsity S]``

The same weights are evaluated twice: with every projection dense, and with top-K keeping ``1 − S``
of every projection input (or the checkpoint's own sparsity when ``--sparsity`` is not given).
``--ppl`` takes text or JSONL (``text`` field); ``--mc`` takes JSONL lines
``{"context": str, "choices": [str, ...], "label": int}`` (the form ARC / HellaSwag reduce to) and
reports accuracy by summed log-likelihood of each choice and by per-token (length-normalized) one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ConfigError, SparsityConfig
from .data import DataError, make_tokenizer
from .model import Transformer

GROUPS = ("qkv", "out", "gate_up", "down")


def perplexity(apply, params, tokens: np.ndarray, seq_len: int, batch: int = 8) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``seq_len + 1`` tokens."""
    n = (len(tokens) - 1) // seq_len
    if n == 0:
        raise DataError(f"--ppl text has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    windows = np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)]).astype(np.int32)

    @jax.jit
    def nll_sum(params, w):
        logp = jax.nn.log_softmax(apply(params, w[:, :-1]).astype(jnp.float32), -1)
        return -jnp.sum(jnp.take_along_axis(logp, w[:, 1:, None], -1))

    total = sum(float(nll_sum(params, windows[i:i + batch])) for i in range(0, n, batch))
    return math.exp(total / (n * seq_len))


def choice_logprobs(apply, params, tok, context: str, choices: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probability of each choice's tokens after the context, and the choice lengths."""
    ctx = list(tok.encode(context))
    conts = [list(tok.encode(c)) for c in choices]
    if not ctx or any(not c for c in conts):
        raise DataError("--mc: every context and choice must encode to at least one token")
    seqs = [ctx + c for c in conts]
    width = max(map(len, seqs))
    padded = np.zeros((len(seqs), width), np.int32)  # right padding never affects earlier positions
    for i, s in enumerate(seqs):
        padded[i, :len(s)] = s
    logp = np.asarray(jax.nn.log_softmax(apply(params, jnp.asarray(padded)).astype(jnp.float32), -1))
    scores = []
    for i, c in enumerate(conts):
        pos = np.arange(len(ctx) - 1, len(ctx) - 1 + len(c))  # position t predicts token t + 1
        scores.append(float(logp[i, pos, padded[i, pos + 1]].sum()))
    return np.asarray(scores), np.asarray([len(c) for c in conts])


def mc_accuracy(apply, params, tok, items: list[dict]) -> dict[str, float]:
    correct = correct_norm = 0
    for it in items:
        scores, lengths = choice_logprobs(apply, params, tok, it["context"], it["choices"])
        correct += int(np.argmax(scores) == it["label"])
        correct_norm += int(np.argmax(scores / lengths) == it["label"])
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items)}


def read_mc(path: str) -> list[dict]:
    items = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise DataError(f"cannot read --mc file {path}: {e.strerror}") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            it = json.loads(line)
            ok = (isinstance(it["context"], str) and isinstance(it["choices"], list) and len(it["choices"]) >= 2
                  and all(isinstance(c, str) for c in it["choices"]) and isinstance(it["label"], int)
                  and 0 <= it["label"] < len(it["choices"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            ok = False
        if not ok:
            raise DataError(f"{path}:{i + 1}: expected {{\"context\": str, \"choices\": [str, str, ...], \"label\": int}}")
        items.append(it)
    if not items:
        raise DataError(f"--mc file {path} holds no items")
    return items


def read_text(path: str) -> str:
    from .config import DataConfig
    from .data import iter_documents

    return "\n".join(text for _, text in iter_documents(DataConfig(source=path)))


def load_model(args) -> tuple[Transformer, object]:
    """The model (weights + its own config) and its tokenizer."""
    if args.hf:
        from .hf import load_pretrained

        model = load_pretrained(args.hf)
        tok_path = Path(args.hf) / "tokenizer.json"
        tok = make_tokenizer(args.tokenizer or (str(tok_path) if tok_path.is_file() else "byte"))
        return model, tok
    from .convert import load_checkpoint_model

    cfg, params, graphdef = load_checkpoint_model(args.ckpt)
    return nnx.merge(graphdef, params), make_tokenizer(args.tokenizer or cfg.data.tokenizer)


def with_sparsity(model: Transformer, sparsity: SparsityConfig) -> tuple:
    """(apply, params) of the same weights under another sparsity setting."""
    from .model import functional, with_config

    return functional(with_config(model, sparsity=sparsity))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsparse_jax.eval", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="HF model directory (llama / mistral / qwen2)")
    src.add_argument("--ckpt", help="training checkpoint directory (or one step of it)")
    p.add_argument("--ppl", help="text or JSONL file for perplexity")
    p.add_argument("--mc", help="JSONL of {context, choices, label} items")
    p.add_argument("--sparsity", type=float, default=None, help="top-K sparsity of every projection for the sparse column")
    p.add_argument("--block-size", type=int, default=None, help="Block Q-Sparse N:M block size")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json (default: the model's)")
    args = p.parse_args(argv)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        if not (args.ppl or args.mc):
            raise ConfigError("give --ppl FILE and/or --mc FILE")
        model, tok = load_model(args)
        own = model.config.sparsity
        sparse = (SparsityConfig.uniform(args.sparsity, block_size=args.block_size) if args.sparsity is not None
                  else own)
        if not sparse.enabled:
            raise ConfigError("the model is dense: give --sparsity S (0 < S < 1) for the sparse column")
        model.config.replace(sparsity=sparse)  # validates S and the block size against this model
        columns = {"dense": SparsityConfig(), f"sparse (S={max(getattr(sparse, g) for g in GROUPS):g}"
                   f"{f', {sparse.block_size}-blocks' if sparse.block_size else ''})": sparse}
        ppl_tokens = tok.encode(read_text(args.ppl)).astype(np.int32) if args.ppl else None
        mc_items = read_mc(args.mc) if args.mc else None
        rows = {}
        for name, sp in columns.items():
            apply, params = with_sparsity(model, sp)
            r = {}
            if ppl_tokens is not None:
                r["perplexity"] = perplexity(apply, params, ppl_tokens, min(args.seq_len, model.config.max_seq_len))
            if mc_items is not None:
                r.update(mc_accuracy(apply, params, tok, mc_items))
            rows[name] = r
    except ConfigError as e:  # DataError, HFError, CheckpointError are ConfigErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    keys = list(next(iter(rows.values())))
    print(f"{'':<28}" + "".join(f"{k:>14}" for k in keys))
    for name, r in rows.items():
        print(f"{name:<28}" + "".join(f"{r[k]:>14.4f}" for k in keys))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
