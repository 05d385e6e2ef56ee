"""LTE probes: FFN sparsity per layer and per token of a model, measured block by block.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..nn.lte import _blocks, walk


def layer_sparsity(model, tokens) -> list[float]:
    """Measured FFN sparsity (fraction of neurons skipped per token) of each layer."""
    res = []
    for _, st in walk(model, tokens):
        E = model.config.hidden_dim // model.config.lte.expert_size
        res.append(1.0 - float(st["lte_active"]) / (float(st["lte_tokens"]) * E))
    return res


def token_sparsity(model, tokens) -> np.ndarray:
    """[layers, tokens]: the fraction of experts skipped by each token in each layer."""
    rows = []
    for block, (xin, _) in zip(_blocks(model), walk(model, tokens)):
        sel = block.mlp.select(block.mlp.scores(xin))
        rows.append(1.0 - np.asarray(jnp.mean(sel.astype(jnp.float32), axis=-1)).reshape(-1))
    return np.stack(rows)

