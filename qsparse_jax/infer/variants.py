"""Variants of one model's weights for inference: another sparsity, the packed kernels, LTE execution.

:func:`sparsity_config` is the one way from command-line sparsity options to a ``SparsityConfig``:
unset fields keep the model's own (block size, rescale, gradient), so a Block Q-Sparse model stays
blocked. No variant copies the weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import KERNELS, PROJECTION_GROUPS, LTEConfig, SparsityConfig
from ..errors import ConfigError
from ..nn.layers import pack_for_inference
from ..nn.lte import (
    ExpertMajor,
    LTEFeedForward,
    _blocks,
    _copy_into,
    expert_major_weights,
    walk,
)
from ..nn.model import Transformer, functional, with_config


def sparsity_config(sparsity: float | None = None, *, default: SparsityConfig | None = None,
                    block_size: int | None = None, **groups: float | None) -> SparsityConfig:
    """One ``sparsity`` for every projection group, or per group (``qkv``, ``out``, ``gate_up``,
    ``down``; unset groups take ``sparsity``, else the ``default`` config's value, else 0)."""
    unknown = set(groups) - set(PROJECTION_GROUPS)
    if unknown:
        raise ConfigError(f"unknown projection group(s) {sorted(unknown)}; known: {', '.join(PROJECTION_GROUPS)}")
    base = default or SparsityConfig()
    vals = {}
    for g in PROJECTION_GROUPS:
        v = groups.get(g)
        vals[g] = float(v if v is not None else sparsity if sparsity is not None else getattr(base, g))
    bs = block_size if block_size is not None else base.block_size
    return SparsityConfig(**vals, block_size=bs, rescale=base.rescale, grad=base.grad)


def variant(model: Transformer, sparsity: SparsityConfig, kernels: str = "off", bits: float = 2):
    """``(apply, params)`` of the same weights (no copy) under ``sparsity`` and ``kernels``; with kernels
    on, the 1.58-bit weights are packed once here. Validates both against the model (one-line errors)."""

    if kernels not in KERNELS:
        raise ConfigError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    m = with_config(model, sparsity=sparsity, kernels=kernels)
    if kernels != "off":
        m = pack_for_inference(m, bits)
    return functional(m)


def dense_variant(model):
    """The same weights as a plain dense-FFN ``Transformer`` (routers dropped): the dense baseline of
    an LTE model (e.g. ``generate``'s tokens/s comparison)."""

    cfg = model.config.replace(lte=LTEConfig())
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    target = nnx.to_pure_dict(state)
    _copy_into(target, nnx.to_pure_dict(nnx.state(model)), skip=("router",))
    nnx.replace_by_pure_dict(state, target)
    return nnx.merge(graphdef, state)


def with_execution(model, execution: str = "gather"):
    """The LTE model with ``model.lte.execution`` changed (same weights)."""
    import dataclasses

    m = with_config(model, lte=dataclasses.replace(model.config.lte, execution=execution))
    if execution == "gather":
        for _, mod in nnx.iter_modules(m):
            if isinstance(mod, LTEFeedForward):
                w = (jax.vmap(lambda st: expert_major_weights(nnx.merge(nnx.graphdef(mod), st)))(nnx.state(mod))
                     if m.config.scan_layers else expert_major_weights(mod))
                mod.expert_major = nnx.data(ExpertMajor(w))
    return m


def decode_union(model, tokens) -> dict:
    """For tokens [B, T] (e.g. a decoded batch): the mean selected experts per token and the mean union
    of the B rows' experts at each position (what one batched decode step reads), per layer and mean."""
    per_tok, union = [], []
    for block, (xin, _) in zip(_blocks(model), walk(model, jnp.asarray(tokens))):
        sel = block.mlp.select(block.mlp.scores(xin))  # [B, T, E]
        per_tok.append(float(jnp.mean(jnp.sum(sel, -1))))
        union.append(float(jnp.mean(jnp.sum(jnp.any(sel, axis=0), -1))))
    E = model.config.hidden_dim // model.config.lte.expert_size
    return {"experts": E, "selected_per_token": float(np.mean(per_tok)), "union_per_step": float(np.mean(union)),
            "selected_per_token_layers": per_tok, "union_per_step_layers": union}

