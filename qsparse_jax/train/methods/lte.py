"""LTE as a training method: efficiency and separability terms, frozen routers in stage 2, sparsity metrics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ...nn.lte import lte_summary
from .base import TrainingMethod, key_path


class LTEMethod(TrainingMethod):
    """LTE in the trainer: stage 1 adds ``η · L_eff + λ_sep · L_sep`` (sums over the batch's tokens,
    each layer's term averaged over layers); routers are never weight-decayed; stage 2 and MoEfication
    freeze every router (no gradient, no update: bit-identical); at log steps, FFN sparsity (overall and per layer when the stats hold
    per-layer vectors), FFN FLOPs per token and the router-score histogram."""

    name = "lte"
    needs_stats = True
    # routers are not added at --init_from (they need the neurons grouped and permuted first)
    init_from_hint = "make an LTE checkpoint from a dense one with qsparse lte convert"

    def __init__(self, cfg):
        self.model_cfg = cfg.model
        self.lte = cfg.model.lte
        self.n_layers = cfg.model.n_layers

    def loss_terms(self, ctx, consts):
        lte = self.lte
        if lte.mode != "lte" or lte.stage != 1:
            return {}
        st, terms = ctx.stats, {}
        if lte.eta > 0:
            terms["lte_efficiency"] = lte.eta * jnp.sum(st["lte_eff"]) / self.n_layers
        if lte.separability > 0:
            terms["lte_separability"] = lte.separability * jnp.sum(st["lte_sep"]) / self.n_layers
        return terms

    def frozen(self, trainable):
        if self.lte.mode == "lte" and self.lte.stage == 1:
            return None
        return jax.tree_util.tree_map_with_path(lambda p, _: "router" in key_path(p), trainable)

    def no_decay(self, trainable):
        """Routers are not weight-decayed: decay would pull their scores toward ``σ(0) = τ`` against the
        separability term (the paper says nothing of decaying them; its code is not public)."""
        return jax.tree_util.tree_map_with_path(lambda p, _: "router" in key_path(p), trainable)

    def log_metrics(self, params, stats, n_tokens):
        if not stats or "lte_active" not in stats:
            return {}
        summary, hist = lte_summary(self.model_cfg, stats)
        return {"lte": summary, "lte_hist": hist}

