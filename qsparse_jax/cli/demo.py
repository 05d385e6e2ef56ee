"""``qsparse demo``: a forward pass of a tiny untrained sparse model on bytes of a Python source file.

``qsparse demo [--sparsity 0.3] [--block_size M] [--act_bits 8] [--weight_bits 1.58]`` prints the loss
of the untrained model (about ln 256 = 5.55 nats per byte), the sparsity measured at every projection
input (Q-Sparse's Table 2) and the activated parameters per token. Needs no data and no download.
"""

from __future__ import annotations

import jax
import numpy as np

from ..analysis.forward import forward_stats
from ..config import ModelConfig, SparsityConfig
from ..infer.variants import sparsity_config
from .common import Parser, add_sparsity_options, command, sparsity_options, summary

DEFAULT_SPARSITY = 0.3


@command()
def main(argv=None) -> int:
    p = Parser(prog="qsparse demo", description=summary(__doc__))
    add_sparsity_options(p, run="the model", default=str(DEFAULT_SPARSITY))
    p.add_argument("--act_bits", type=int, default=None, choices=[8], help="8: int8 activations")
    p.add_argument("--weight_bits", default=None, choices=["1.58", "1"], help="1.58: ternary weights (BitNet b1.58)")
    p.add_argument("--seq_len", type=int, default=256, help="bytes per row (default 256)")
    p.add_argument("--batch", type=int, default=4, help="rows (default 4)")
    args = p.parse_args(argv)
    sparsity = sparsity_config(default=SparsityConfig.uniform(DEFAULT_SPARSITY), **sparsity_options(args))
    cfg = ModelConfig(sparsity=sparsity, act_bits=args.act_bits, weight_bits=args.weight_bits)
    r = forward_stats(cfg, args.batch, args.seq_len)
    stats, s = r["sparsity"], max(sparsity.qkv, sparsity.out, sparsity.gate_up, sparsity.down)
    print(f"devices: {jax.devices()}")
    print(f"model: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, GLU {cfg.hidden_dim} ({cfg.activation}), "
          f"sparsity {s:g}{f' in blocks of {sparsity.block_size}' if sparsity.block_size else ''}, "
          f"act_bits {cfg.act_bits}, weight_bits {cfg.weight_bits}")
    print(f"logits {r['logits_shape']}; loss {r['loss']:.3f} nats/byte (untrained; ln 256 = {np.log(256):.3f})")
    print("measured sparsity at each projection input:")
    labels = {"qkv": "QKV", "out": "Out", "up": "Up", "gate": "Gate", "down": "Down", "overall": "Overall"}
    print("  " + "  ".join(f"{label} {stats[k]:6.1%}" for k, label in labels.items()))
    print(f"activated parameters per token N_a = {stats['N_a'] / 1e6:.2f}M of {stats['N_proj'] / 1e6:.2f}M "
          f"projection weights (total {stats['N_total'] / 1e6:.2f}M)")
    return 0
