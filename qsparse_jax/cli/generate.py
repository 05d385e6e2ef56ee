"""TODO docstring (generate)."""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from ..checkpoints.source import load
from ..config import KERNELS, SparsityConfig, load_config
from ..data.tokenizer import make_tokenizer
from ..errors import ConfigError
from ..infer.generate import generate
from ..infer.variants import decode_union, dense_variant, variant, with_execution
from ..nn.model import Transformer, functional
from ..train.aot import decode_report, format_decode_report


def _load(args):
    """(model, tokenizer) from --hf / --ckpt (the shared inference loader) or a fresh --config model."""
    if args.config:
        from flax import nnx


        cfg = load_config(args.config, args.overrides)
        return Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed)), make_tokenizer(cfg.data.tokenizer)

    ld = load(hf=args.hf, ckpt=args.ckpt, tokenizer=args.tokenizer)
    return ld.model, ld.tokenizer


def _compile_only(args) -> int:

    try:
        if not args.config:
            raise ConfigError("--compile_only needs --config (the model to compile; no weights are read)")
        if args.batch < 1 or args.prompt_len < 1 or args.max_new_tokens < 2:
            raise ConfigError("--batch and --prompt_len must be positive and --max-new-tokens at least 2")
        cfg = load_config(args.config, args.overrides)
        if args.sparsity is not None:
            import dataclasses

            cfg = dataclasses.replace(cfg, model=cfg.model.replace(sparsity=SparsityConfig.uniform(args.sparsity)))
        r = decode_report(cfg, args.topology, args.batch, args.prompt_len, args.max_new_tokens)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_decode_report(r, args.config))
    return 1 if r["fits"] is False else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsparse_jax.generate", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="HF model directory")
    src.add_argument("--ckpt", help="training checkpoint directory (or one step of it)")
    src.add_argument("--config", help="a config YAML: randomly initialized weights (speed only)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (with --config)")
    p.add_argument("--prompt", default="def fibonacci(n):")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1, help="copies of the prompt decoded together")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--sparsity", type=float, default=None, help="uniform top-K sparsity for the sparse run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kernels", default="off", choices=KERNELS,
                   help="1.58-bit models: decode through the packed int8 x ternary kernels (weights packed once)")
    p.add_argument("--bits", type=float, default=2, choices=[2, 1.6], help="packed weight format with --kernels")
    p.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json (default: the model's)")
    p.add_argument("--compile_only", action="store_true",
                   help="with --config: compile prefill + KV-cache decode for --topology (or the local devices) "
                        "and report memory and the compiler's tokens/s; nothing runs")
    p.add_argument("--topology", help="with --compile_only: a TPU slice, e.g. v5e-8, v5p-128")
    p.add_argument("--prompt_len", type=int, default=128, help="with --compile_only: prompt length in tokens")
    args = p.parse_args(argv)
    if args.compile_only:
        return _compile_only(args)
    from absl import logging as absl_logging


    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        if args.overrides and not args.config:
            raise ConfigError("key=value overrides need --config")
        if args.batch < 1 or args.repeats < 1:
            raise ConfigError("--batch and --repeats must be positive")
        model, tok = _load(args)
        sparse = (SparsityConfig.uniform(args.sparsity) if args.sparsity is not None else model.config.sparsity)
        ids = tok.encode(args.prompt).astype(np.int32)
        if len(ids) == 0:
            raise ConfigError("--prompt is empty after tokenization")
        prompt = np.tile(ids[None], (args.batch, 1))
        runs = {"sparse": sparse, "dense": SparsityConfig()} if sparse.enabled else {"dense": SparsityConfig()}
        models = dict.fromkeys(runs, model)
        if model.config.lte.enabled:  # LTE: only the selected experts (gather) vs the same weights, dense FFN

            if args.kernels != "off" or args.sparsity is not None:
                raise ConfigError("an LTE model decodes with its own sparsity and kernels off (no --kernels, --sparsity)")
            runs = {"lte": sparse, "dense": sparse}
            models = {"lte": with_execution(model, "gather"), "dense": dense_variant(model)}
        results = {}
        for name, sp in runs.items():
            if model.config.lte.enabled:
                apply, params = functional(models[name])
            else:
                apply, params = variant(model, sp, args.kernels, args.bits)  # validates S, kernels; packs once
            out, t = generate(apply, params, apply.config, prompt, args.max_new_tokens,
                              temperature=args.temperature, repeats=args.repeats)
            results[name] = (out, t)
    except ConfigError as e:  # DataError, HFError, CheckpointError are ConfigErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    first = next(iter(results))
    print(f"{args.prompt}{tok.decode(results[first][0][0])}")
    print(f"\n{'run':<8} {'prefill ms':>11} {'decode tok/s':>13}   (batch {args.batch}, {args.max_new_tokens} new tokens, "
          f"kernels {args.kernels}, {jax.devices()[0].platform})")
    for name, (_, t) in results.items():
        print(f"{name:<8} {t['prefill_s'] * 1e3:>11.2f} {t['tokens_per_s']:>13.1f}")
    if "lte" in results:

        u = decode_union(model, results["lte"][0])
        print(f"lte / dense decode speed: {results['lte'][1]['tokens_per_s'] / results['dense'][1]['tokens_per_s']:.3f}x; "
              f"experts per layer {u['experts']}, selected per token {u['selected_per_token']:.2f}, "
              f"union read per decode step (batch {args.batch}) {u['union_per_step']:.2f}")
    elif len(results) == 2:
        print(f"sparse / dense decode speed: {results['sparse'][1]['tokens_per_s'] / results['dense'][1]['tokens_per_s']:.3f}x")
    return 0

