"""AST as a training method: N:M masks refreshed on a schedule, the annealed decay, SLoRB, exact resume.

Adaptive Sparse Trainer (Huang et al., arXiv 2407.20584); the math is ``ops/nm.py``'s. Where the paper is
vague this follows the authors' code (thu-ml/Adaptive-Sparse-Trainer: ``main.py``, ``sparse_modeling.py``,
``LLaMA-2-7B/train.py``, ``LLaMA-2-7B/llmshearing/sparse/sparse_modeling.py``):

* the decay ``λ(t)·(¬M)⊙W`` is added to the gradient **after** global-norm clipping (GPT-2: clipping, then
  their AdamW adds it; LLaMA: a Composer callback at ``AFTER_TRAIN_BATCH``, after the clipping algorithm);
  ``decay_after_clip: false`` adds it before clipping instead;
* masks are scored by ``|W|`` (their LLaMA run) or Wanda ``|W|·‖x_j‖`` (``score: wanda``; their GPT-2 option),
  the norms computed once from calibration data on the dense model and fixed for the run (``act_norms``:
  :func:`save_act_norms` of ``transforms.calibration.calibrate``'s output);
* SLoRB ``S`` starts as the group means of the pruned weights of the **dense** model at the initial mask; at
  a one-shot-pruned start (the loaded pruned weights are all zero) they are read from the dense original
  (``weight_sparsity.source``, else ``train.distill.teacher``); without one the start is refused;
* the trainable ``X`` is the full ``[in/k, in]`` projection (``train_proj``), initialized to the group sums;
* SLoRB's ``S`` and ``X`` are not weight-decayed (they are the method's own parameters; the authors' LLaMA
  recipe has weight decay 0, their GPT-2 script decays every matrix, ``S`` included).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...checkpoints.source import is_hf, load_model
from ...config import Config
from ...errors import ConfigError
from ...nn.layers import WeightMask
from ...ops.nm import decay_lambda, decayed_grad, nm_mask, slorb_init, wanda_score
from .base import TrainingMethod, key_path, leaves_by_path, per_layer

SLORB = ("slorb_s", "slorb_x")


def save_act_norms(path: str | Path, calibration: list[dict]) -> Path:
    """Write ``transforms.calibration.calibrate``'s per-layer ``act_norm`` (``‖x_j‖₂`` of each linear's input)
    as ``.npz`` for ``weight_sparsity.act_norms``: one ``[n_layers, in]`` array per linear, keyed by its path
    inside the block (``attn/wq``, ``mlp/w_down``, ...)."""
    keys = list(calibration[0])
    arrays = {"/".join(map(str, k)): np.stack([np.asarray(layer[k]["act_norm"], np.float32) for layer in calibration])
              for k in keys}
    path = Path(path)
    np.savez(path, **arrays)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def load_act_norms(path: str) -> dict[str, np.ndarray]:
    """``{"attn/wq": [n_layers, in], ...}`` from :func:`save_act_norms`'s file; a missing or unreadable file is
    a one-line ConfigError."""
    try:
        with np.load(path) as f:
            return {k: np.asarray(f[k], np.float32) for k in f.files}
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.weight_sparsity.act_norms: cannot read {path!r} ({type(e).__name__}: {e})") from None


class AdaptiveSparseTraining(TrainingMethod):
    """AST (arXiv 2407.20584; SEEDS §2). The forward ``W ⊙ M`` with straight-through backward is in
    ``layers.SparseLinear``; here: masks re-chosen every ``mask_every`` steps from ``|W|`` or Wanda scores
    (N:M along the input axis, ``ops.nm.nm_mask``), the annealed decay ``g += λ(t)·(¬M)⊙W`` (after clipping by
    default), flip rates since the last refresh and since the start (per layer and overall), and on a fresh
    start (also after ``--init_from``) masks and SLoRB ``S`` re-made from the weights (see the module docstring
    for a one-shot-pruned start)."""

    name = "ast"
    adds = ("mask", "slorb_s", "slorb_x")

    def __init__(self, cfg: Config):
        self.ws = cfg.model.weight_sparsity
        self.n_layers = cfg.model.n_layers
        self.stacked = cfg.model.scan_layers
        self.source = self.ws.source or cfg.train.distill.teacher
        self.source_key = "model.weight_sparsity.source" if self.ws.source else "train.distill.teacher"
        self.norms = None
        if self.ws.score == "wanda":
            if not self.ws.act_norms:
                raise ConfigError("model.weight_sparsity.score: wanda needs model.weight_sparsity.act_norms (an .npz of "
                                  "the dense model's calibration norms, methods.ast.save_act_norms)")
            self.norms = load_act_norms(self.ws.act_norms)

    @staticmethod
    def _masks(params):
        return nnx.split_state(params, WeightMask, ...)[0]

    def _weights_of(self, params) -> dict[tuple, jax.Array]:
        """Each masked weight, keyed by its mask's path."""
        flat = leaves_by_path(params)
        return {p: flat[p[:-1] + ("weight",)] for p in leaves_by_path(self._masks(params))}

    def _act_norm(self, mask_path: tuple, w: jax.Array) -> np.ndarray:
        """The calibration norms ``‖x_j‖`` of a masked weight: ``[L, in]`` stacked, ``[in]`` for layer ``i``."""
        block = mask_path[1:-1] if self.stacked else mask_path[2:-1]
        key = "/".join(map(str, block))
        if key not in self.norms:
            raise ConfigError(f"model.weight_sparsity.act_norms {self.ws.act_norms} has no norms for {key} "
                              f"(it has {', '.join(sorted(self.norms))})")
        a = self.norms[key] if self.stacked else self.norms[key][mask_path[1]]
        if a.shape != w.shape[:-1]:
            raise ConfigError(f"model.weight_sparsity.act_norms {self.ws.act_norms}: {key} has shape {a.shape}, "
                              f"this model needs {tuple(w.shape[:-1])}")
        return a

    def _score(self, mask_path: tuple, w: jax.Array) -> jax.Array:
        if self.norms is None:
            return jnp.abs(w)
        return wanda_score(w, self._act_norm(mask_path, w))

    def _new_masks(self, params):
        weights = self._weights_of(params)
        return jax.tree_util.tree_map_with_path(
            lambda p, _: nm_mask(self._score(key_path(p), weights[key_path(p)]), self.ws.n, self.ws.m),
            self._masks(params))

    def _flip(self, old, new) -> jax.Array:
        a, b = leaves_by_path(old), leaves_by_path(new)
        changed = per_layer({p: a[p] != b[p] for p in a}, self.n_layers, self.stacked)
        total = per_layer({p: jnp.ones_like(a[p], jnp.float32) for p in a}, self.n_layers, self.stacked)
        return changed / total

    def _decay(self, grads, params, step):
        if self.ws.decay_rate == 0 or self.ws.decay_max == 0:
            return grads if self.ws.decay_after_clip else self._decay(grads, params, step)
        lam = decay_lambda(step, rate=self.ws.decay_rate, warm=self.ws.decay_max / self.ws.decay_rate,
                           max_=self.ws.decay_max)
        masks, flat = leaves_by_path(self._masks(params)), leaves_by_path(params)

        def one(path, g):
            p = key_path(path)
            if p[-1] != "weight" or p[:-1] + ("mask",) not in masks:
                return g
            return decayed_grad(g, flat[p], masks[p[:-1] + ("mask",)], lam).astype(g.dtype)

        return jax.tree_util.tree_map_with_path(one, grads)

    def adjust_grads(self, grads, params, step):
        return grads if self.ws.decay_after_clip else self._decay(grads, params, step)

    def adjust_clipped(self, grads, params, step):
        return self._decay(grads, params, step) if self.ws.decay_after_clip else grads

    def no_decay(self, trainable):
        return jax.tree_util.tree_map_with_path(lambda p, _: key_path(p)[-1] in SLORB, trainable)

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

    def _pruned_at_start(self, params) -> list[tuple]:
        """Masked weights (by mask path) whose pruned positions are all zero under their own initial mask: a
        one-shot-pruned start, where SLoRB's group means of the pruned weights would be 0."""
        masks = self._new_masks(params)
        weights, flat = self._weights_of(params), leaves_by_path(masks)
        return [p for p, w in weights.items() if not bool(jnp.any(jnp.where(flat[p], 0, w) != 0))]

    def _source_weights(self, mesh) -> dict[tuple, jax.Array]:
        """The dense original's block weights, keyed ``(layer, *path in the block)``."""
        path = Path(self.source)
        if not path.is_dir():
            raise ConfigError(f"{self.source_key}: no such directory {self.source!r}")
        model, _ = load_model(**{"hf" if is_hf(path) else "ckpt": str(path)}, mesh=mesh,
                              flags=(self.source_key, self.source_key))
        out = {}
        for p, v in leaves_by_path(nnx.state(model)).items():
            if p[0] == "layers" and p[-1] == "weight" and v.ndim >= 2:
                if model.config.scan_layers:
                    out.update({(i, *p[1:]): v[i] for i in range(v.shape[0])})
                else:
                    out[(p[1], *p[2:])] = v
        return out

    def before_start(self, params, mesh):
        """SLoRB at a one-shot-pruned start: ``S`` from the dense original's weights at the initial mask (the
        loaded zeros would give ``S = 0``); without a dense original, a one-line ConfigError."""
        if not self.ws.slorb or not (pruned := self._pruned_at_start(params)):
            return params
        if not self.source:
            raise ConfigError("SLoRB from a one-shot-pruned start (the loaded weights are already N:M, so S would be 0) "
                              "needs the dense original: set model.weight_sparsity.source or train.distill.teacher")
        dense, masks = self._source_weights(mesh), leaves_by_path(self._new_masks(params))
        k, s_given = self.ws.slorb_group, {}
        for mp in pruned:
            layers = range(self.n_layers) if self.stacked else [mp[1]]
            block = mp[1:-1] if self.stacked else mp[2:-1]
            ws = [dense.get((i, *block, "weight")) for i in layers]
            like = masks[mp][0] if self.stacked else masks[mp]
            if any(w is None or w.shape != like.shape for w in ws):
                raise ConfigError(f"{self.source_key} {self.source}: no {'/'.join(map(str, block))} weight of shape "
                                  f"{tuple(like.shape)}; the dense original must be this model's architecture")
            w = jnp.stack(ws) if self.stacked else ws[0]
            fn = lambda w, m: slorb_init(w, m, k)
            S = jax.vmap(fn)(w, masks[mp]) if self.stacked else fn(w, masks[mp])
            if not bool(jnp.any(S != 0)):
                raise ConfigError(f"{self.source_key} {self.source} is pruned too ({'/'.join(map(str, block))} has "
                                  "zeros at every pruned position): give the dense original")
            s_given[mp[:-1] + ("slorb_s",)] = S

        def one(path, v):
            p = key_path(path)
            return jax.device_put(s_given[p].astype(v.dtype), v.sharding) if p in s_given else v

        return jax.tree_util.tree_map_with_path(one, params)

    def prepare(self, params):
        """Masks from the weights' scores; SLoRB ``S`` from the pruned weights' group means, except where those
        are all zero (a one-shot-pruned start), which keep the ``S`` that :meth:`before_start` read."""

        params = nnx.merge_state(params, self._new_masks(params))
        if not self.ws.slorb:
            return params
        flat = leaves_by_path(params)

        def one(path, s):
            p = key_path(path)
            if p[-1] != "slorb_s":
                return s
            w, mask = flat[p[:-1] + ("weight",)], flat[p[:-1] + ("mask",)]
            fn = lambda w, m, s: jnp.where(jnp.any(jnp.where(m, 0, w) != 0), slorb_init(w, m, self.ws.slorb_group), s)
            return (jax.vmap(fn)(w, mask, s) if w.ndim == 3 else fn(w, mask, s)).astype(s.dtype)

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
