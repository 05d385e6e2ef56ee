"""``qsparse generate``: continue a prompt and time KV-cache decoding of the same weights, sparse vs dense.

``qsparse generate (--hf DIR | --ckpt DIR | --config YAML [key=value ...]) [--prompt TEXT]
[--max_new_tokens N] [--batch B] [--sparsity S] [--kernels on]``

Prints the continuation, then prefill time and decode tokens/s of the sparse run (the model's own
sparsity, or ``--sparsity`` / ``--block_size`` on top of it: a Block Q-Sparse model keeps its N:M
blocks) and of the same weights dense, and their ratio. An LTE model runs reading only its selected
experts against a dense FFN. ``--config`` decodes randomly initialized weights (speed only);
``--compile_only`` with ``--config`` compiles decoding without running it (as ``qsparse compile --decode``).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from ..checkpoints.source import load
from ..config import KERNELS, load_config
from ..data.tokenizer import make_tokenizer
from ..errors import ConfigError
from ..infer.generate import decode_runs
from ..infer.variants import decode_union
from ..nn.model import Transformer
from .common import (
    Parser,
    add_source_options,
    add_sparsity_options,
    command,
    sparsity_options,
    summary,
)
from .compile import run_decode
from .train import add_compile_options, check_compile_options

RUN_ONLY = ("prompt", "temperature", "repeats", "tokenizer")  # options of a run that --compile_only has no use for


def _load(args):
    """(model, tokenizer) from --hf / --ckpt (the shared source resolver) or a fresh --config model."""
    if args.config:
        cfg = load_config(args.config, args.overrides)
        return Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed)), make_tokenizer(cfg.data.tokenizer)
    ld = load(hf=args.hf, ckpt=args.ckpt, tokenizer=args.tokenizer)
    return ld.model, ld.tokenizer


@command()
def main(argv=None) -> int:
    p = Parser(prog="qsparse generate", description=summary(__doc__))
    src = add_source_options(p)
    src.add_argument("--config", help="a config YAML: randomly initialized weights (speed only)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (with --config)")
    p.add_argument("--prompt", default="def fibonacci(n):", help="the text to continue")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens generated after the prompt (default 64)")
    p.add_argument("--batch", type=int, default=1, help="copies of the prompt decoded together (default 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 (default): greedy")
    add_sparsity_options(p)
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the compile run; the median is kept")
    p.add_argument("--kernels", default=None, choices=KERNELS,
                   help="1.58-bit models: decode through the packed int8 x ternary kernels (weights packed once; "
                        "default off, with --compile_only the config's model.kernels)")
    p.add_argument("--bits", type=float, default=None, choices=[2, 1.6],
                   help="packed weight format with --kernels on (default 2)")
    p.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json (default: the model's)")
    p.add_argument("--compile_only", action="store_true",
                   help="with --config: compile prefill + KV-cache decoding for --topology (or the local devices) "
                        "and report memory and the compiler's tokens/s; nothing runs (as qsparse compile --decode)")
    p.add_argument("--prompt_len", type=int, default=None,
                   help="with --compile_only: prompt length in tokens (default 128)")
    add_compile_options(p, flag="--compile_only")
    args = p.parse_intermixed_args(argv)  # key=value overrides may come between the flags
    if args.compile_only:
        if not args.config:
            raise ConfigError("--compile_only needs --config (the model to compile; no weights are read)")
        run_only = [f"--{k}" for k in RUN_ONLY if getattr(args, k) != p.get_default(k)]
        if run_only:
            raise ConfigError(f"{', '.join(run_only)} go with a run, not --compile_only (nothing is generated)")
        check_compile_options(args)
        args.prompt_len = 128 if args.prompt_len is None else args.prompt_len
        return run_decode(args, args.config)
    if args.topology or args.cpu_devices is not None or args.report_json or args.prompt_len is not None:
        raise ConfigError("--topology, --cpu_devices, --report_json and --prompt_len go with --compile_only "
                          "(a run's prompt is --prompt)")
    if args.overrides and not args.config:
        raise ConfigError("key=value overrides need --config")
    if args.batch < 1:
        raise ConfigError(f"--batch must be positive, got {args.batch}")
    args.kernels = args.kernels or "off"
    if args.bits is not None and args.kernels == "off":
        raise ConfigError(f"--bits {args.bits:g} sets the packed weight format of the kernels; add --kernels on")
    model, tok = _load(args)
    ids = tok.encode(args.prompt).astype(np.int32)
    prompt = np.tile(ids[None], (args.batch, 1))
    runs = decode_runs(model, prompt, args.max_new_tokens, kernels=args.kernels, bits=args.bits or 2,
                       temperature=args.temperature, repeats=args.repeats, **sparsity_options(args))
    first = next(iter(runs.values()))
    print(f"{args.prompt}{tok.decode(first.tokens[0])}")
    print(f"\n{'run':<8} {'prefill ms':>11} {'decode tok/s':>13}   (batch {args.batch}, {args.max_new_tokens} new "
          f"tokens, kernels {args.kernels}, {jax.devices()[0].platform})")
    for name, r in runs.items():
        print(f"{name:<8} {r.timings['prefill_s'] * 1e3:>11.2f} {r.timings['tokens_per_s']:>13.1f}")
    speed = {name: r.timings["tokens_per_s"] for name, r in runs.items()}
    if "lte" in runs:
        u = decode_union(model, runs["lte"].tokens)
        print(f"lte / dense decode speed: {speed['lte'] / speed['dense']:.3f}x; experts per layer {u['experts']}, "
              f"selected per token {u['selected_per_token']:.2f}, union read per decode step (batch {args.batch}) "
              f"{u['union_per_step']:.2f}")
    elif "sparse" in runs:
        print(f"sparse / dense decode speed: {speed['sparse'] / speed['dense']:.3f}x")
    return 0
