"""TODO docstring (demo)."""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import ModelConfig, SparsityConfig
from ..errors import ConfigError
from ..nn.model import Transformer, cross_entropy, functional, measure_sparsity


def stdlib_bytes(n: int) -> np.ndarray:
    """The first n bytes of the standard library's ``json/decoder.py`` (present on every Python)."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py"
    return np.frombuffer(path.read_bytes()[:n], np.uint8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsparse_jax.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsity", type=float, default=0.3, help="top-K sparsity of every projection input")
    p.add_argument("--block-size", type=int, default=None, help="Block Q-Sparse N:M block size M")
    p.add_argument("--act-bits", type=int, default=None, choices=[8])
    p.add_argument("--weight-bits", default=None, choices=["1.58", "1"])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args(argv)
    try:
        if args.seq_len < 2 or args.batch < 1:
            raise ConfigError(f"--seq-len must be >= 2 and --batch >= 1, got {args.seq_len} and {args.batch}")
        sparsity = SparsityConfig.uniform(args.sparsity, block_size=args.block_size)
        cfg = ModelConfig(sparsity=sparsity, act_bits=args.act_bits, weight_bits=args.weight_bits)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = stdlib_bytes(args.batch * (args.seq_len + 1)).astype(np.int32)
    if data.size < args.batch * (args.seq_len + 1):
        print("error: the demo text is shorter than --batch x (--seq-len + 1) bytes", file=sys.stderr)
        return 2
    batch = jnp.asarray(data.reshape(args.batch, args.seq_len + 1))
    apply, params = functional(Transformer(cfg, rngs=nnx.Rngs(0)))
    logits = jax.jit(apply)(params, batch[:, :-1])
    loss = float(cross_entropy(logits, batch[:, 1:]))
    stats = measure_sparsity(apply, params, batch[:, :-1])
    print(f"devices: {jax.devices()}")
    print(f"model: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, GLU {cfg.hidden_dim} ({cfg.activation}), "
          f"sparsity {args.sparsity}{f' in blocks of {args.block_size}' if args.block_size else ''}, "
          f"act_bits {cfg.act_bits}, weight_bits {cfg.weight_bits}")
    print(f"logits {tuple(logits.shape)}; loss {loss:.3f} nats/byte (untrained; ln 256 = {np.log(256):.3f})")
    print("measured sparsity at each projection input:")
    labels = {"qkv": "QKV", "out": "Out", "up": "Up", "gate": "Gate", "down": "Down", "overall": "Overall"}
    print("  " + "  ".join(f"{label} {stats[k]:6.1%}" for k, label in labels.items()))
    print(f"activated parameters per token N_a = {stats['N_a'] / 1e6:.2f}M of {stats['N_proj'] / 1e6:.2f}M "
          f"projection weights (total {stats['N_total'] / 1e6:.2f}M)")
    return 0

