"""AST as a training method: N:M masks refreshed on a schedule, the annealed decay, SLoRB, exact resume.

Adaptive Sparse Trainer (Huang et al., arXiv 2407.20584); the math is ``ops/nm.py``'s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ...config import Config
from ...nn.layers import WeightMask
from ...ops.nm import decay_lambda, decayed_grad, nm_mask, slorb_init
from .base import TrainingMethod, key_path, leaves_by_path, per_layer


class AdaptiveSparseTraining(TrainingMethod):
    """AST (arXiv 2407.20584; SEEDS §2). The forward ``W ⊙ M`` with straight-through backward is in
    ``layers.SparseLinear``; here: masks re-chosen from ``|W|`` every ``mask_every`` steps (N:M along the
    input axis, ``weight_sparsity.nm_mask``), the annealed decay ``g += λ(t)·(¬M)⊙W``, flip rates since
    the last refresh and since the start (per layer and overall), and on a fresh start (also after
    ``--init_from`` of a dense checkpoint) masks and SLoRB ``S`` re-made from the weights."""

    name = "ast"
    adds = ("mask", "slorb_s", "slorb_x")

    def __init__(self, cfg: Config):
        self.ws = cfg.model.weight_sparsity
        self.n_layers = cfg.model.n_layers
        self.stacked = cfg.model.scan_layers

    @staticmethod
    def _masks(params):
        return nnx.split_state(params, WeightMask, ...)[0]

    def _weights_of(self, params) -> dict[tuple, jax.Array]:
        """Each masked weight, keyed by its mask's path."""
        flat = leaves_by_path(params)
        return {p: flat[p[:-1] + ("weight",)] for p in leaves_by_path(self._masks(params))}

    def _new_masks(self, params):
        weights = self._weights_of(params)
        return jax.tree_util.tree_map_with_path(
            lambda p, _: nm_mask(jnp.abs(weights[key_path(p)]), self.ws.n, self.ws.m), self._masks(params))

    def _flip(self, old, new) -> jax.Array:
        a, b = leaves_by_path(old), leaves_by_path(new)
        changed = per_layer({p: a[p] != b[p] for p in a}, self.n_layers, self.stacked)
        total = per_layer({p: jnp.ones_like(a[p], jnp.float32) for p in a}, self.n_layers, self.stacked)
        return changed / total

    def adjust_grads(self, grads, params, step):
        if self.ws.decay_rate == 0 or self.ws.decay_max == 0:
            return grads
        lam = decay_lambda(step, rate=self.ws.decay_rate, warm=self.ws.decay_max / self.ws.decay_rate,
                           max_=self.ws.decay_max)
        masks, flat = leaves_by_path(self._masks(params)), leaves_by_path(params)

        def one(path, g):
            p = key_path(path)
            if p[-1] != "weight" or p[:-1] + ("mask",) not in masks:
                return g
            return decayed_grad(g, flat[p], masks[p[:-1] + ("mask",)], lam).astype(g.dtype)

        return jax.tree_util.tree_map_with_path(one, grads)

    def refresh(self, params, mstate, step):
        every = self.ws.mask_every
        if every == 0:
            return params, mstate
        old = self._masks(params)
        new = jax.lax.cond((step + 1) % every == 0, self._new_masks, lambda p: old, params)
        flipped = jax.lax.cond((step + 1) % every == 0, lambda: self._flip(old, new), lambda: mstate["flip_refresh"])
        return nnx.merge_state(params, new), {**mstate, "flip_refresh": flipped}

    def init_state(self, params):
        return {"mask0": self._masks(params), "flip_refresh": jnp.zeros((self.n_layers,), jnp.float32)}

    def state_shardings(self, param_shardings, replicated):
        return {"mask0": self._masks(param_shardings), "flip_refresh": replicated}

    def prepare(self, params):
        """Masks from the weights by magnitude, SLoRB ``S`` from the pruned weights' group means."""

        params = nnx.merge_state(params, self._new_masks(params))
        if not self.ws.slorb:
            return params
        flat = leaves_by_path(params)

        def one(path, s):
            p = key_path(path)
            if p[-1] != "slorb_s":
                return s
            w, mask = flat[p[:-1] + ("weight",)], flat[p[:-1] + ("mask",)]
            fn = lambda w, m: slorb_init(w, m, self.ws.slorb_group)
            return (jax.vmap(fn)(w, mask) if w.ndim == 3 else fn(w, mask)).astype(s.dtype)

        return jax.tree_util.tree_map_with_path(one, params)

    def step_metrics(self, params, mstate):
        since_start = self._flip(mstate["mask0"], self._masks(params))
        return {"ast/flip_since_start": since_start, "ast/flip_since_refresh": mstate["flip_refresh"]}

    def log_metrics(self, params, stats, n_tokens):
        """Fraction of zeros in the effective weights ``W ⊙ M`` and the groups holding other than N."""
        masks = leaves_by_path(self._masks(params))
        kept = sum(float(jnp.sum(m)) for m in masks.values())
        size = sum(m.size for m in masks.values())
        bad = sum(int(jnp.sum(m.reshape(*m.shape[:-2], -1, self.ws.m, m.shape[-1]).sum(-2) != self.ws.n))
                  for m in masks.values())
        return {"ast/zero_fraction": 1.0 - kept / size, "ast/groups_not_nm": bad}

