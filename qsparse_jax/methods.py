"""How a training method meets the trainer: one small interface, :class:`TrainingMethod`.

The loop in ``trainer.py`` knows no method by name. A method may

- add loss terms (``loss_terms``): SUMS over the counted target tokens, added to the NLL sum, so
  batches and gradient-accumulation micro-batches combine exactly; each is reported per token by name;
- scale the cross-entropy (``ce_weight``; distillation's ``CE`` weight);
- ask for the model's per-layer statistics (``needs_stats``: ``apply(..., return_stats=True)``);
- pass constants into the jitted step (``constants``: e.g. a frozen teacher's parameters, sharded on
  the training mesh, never donated, never updated);
- adjust gradients before the optimizer (``adjust_grads``: AST's annealed decay);
- freeze parameters (``frozen``: zero gradient and zero update, so they stay bit-identical);
- refresh model state on a schedule inside the jitted step, after the update (``refresh``: AST's masks);
- keep its own state in the train state (``init_state`` / ``state_shardings``; checkpointed with it);
- prepare parameters on a fresh start, after ``--init_from`` (``prepare``: AST's masks from the loaded weights);
  the leaves it adds to a model (``adds``: names such as ``mask``) may be missing from that checkpoint;
- add host-side metrics at log steps (``log_metrics``).

:func:`methods_for` builds the list from a config: AST (``model.weight_sparsity``), distillation
(``train.distill``), LTE (``model.lte``, from ``lte.py``).

Parameters are the model's whole ``nnx.State``; only ``nnx.Param`` leaves are differentiated and
optimized (model state such as AST's ``WeightMask`` is carried, not trained).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .config import Config
from .errors import ConfigError


@dataclass
class Context:
    """What a loss term sees of one (micro-)batch's forward pass."""

    logits: jax.Array  # [b, s, vocab] float32
    stats: dict | None  # the model's return_stats dict (``needs_stats``)
    inputs: jax.Array
    targets: jax.Array
    weights: jax.Array | None  # target weights (SFT), None: every target counts
    kwargs: dict = field(default_factory=dict)  # positions / segment_ids for the model
    step: jax.Array | None = None


class TrainingMethod:
    """Defaults: no effect. Subclasses override what they need (see the module docstring)."""

    name = "method"
    needs_stats = False
    ce_weight = 1.0
    adds: tuple[str, ...] = ()  # names of the leaves it adds to a model: a checkpoint without it may lack them
    init_from_hint = ""  # said when an --init_from checkpoint lacks parameters this method needs

    def constants(self, mesh) -> Any:
        return None

    def abstract_constants(self, mesh) -> Any:
        """``constants`` as ``jax.ShapeDtypeStruct``s with shardings (``train.py --compile_only``)."""
        return None

    def loss_terms(self, ctx: Context, consts) -> dict[str, jax.Array]:
        return {}

    def adjust_grads(self, grads, params, step):
        return grads

    def frozen(self, trainable) -> Any | None:
        """A pytree of bools over the trainable ``nnx.Param`` state (True: frozen), or None."""
        return None

    def refresh(self, params, mstate, step):
        """(params, method state) after the optimizer update of step ``step`` (0-based)."""
        return params, mstate

    def init_state(self, params) -> Any:
        return None

    def state_shardings(self, param_shardings, replicated) -> Any:
        return None

    def prepare(self, params):
        return params

    def step_metrics(self, params, mstate) -> dict[str, jax.Array]:
        """Device-side scalars returned by every step (read at log steps)."""
        return {}

    def log_metrics(self, params, stats: dict | None, n_tokens: int) -> dict:
        return {}


def methods_for(cfg: Config) -> list[TrainingMethod]:
    out: list[TrainingMethod] = []
    if cfg.model.weight_sparsity.enabled:
        out.append(AdaptiveSparseTraining(cfg))
    lte = getattr(cfg.model, "lte", None)
    if lte is not None and lte.enabled:
        from .lte import LTEMethod

        out.append(LTEMethod(cfg))
    if cfg.train.distill.enabled:
        out.append(Distillation(cfg))
    return out


# --- helpers over nnx.State paths ------------------------------------------------------------------

def key_path(path) -> tuple:
    """A ``jax.tree_util`` key path of an ``nnx.State`` leaf as plain keys ('layers', 0, 'mlp', ...)."""
    return tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path if not isinstance(k, jax.tree_util.GetAttrKey))


def leaves_by_path(state) -> dict[tuple, jax.Array]:
    return {key_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def per_layer(values: dict[tuple, jax.Array], n_layers: int, stacked: bool) -> jax.Array:
    """Sum each leaf's values into its layer: [n_layers]. ``stacked`` (scan_layers): leaves carry a
    leading layer axis; else the layer index follows 'layers' in the path."""
    total = jnp.zeros((n_layers,), jnp.float32)
    for path, v in values.items():
        v = v.astype(jnp.float32)
        if stacked:
            total = total + v.reshape(n_layers, -1).sum(axis=1)
        else:
            total = total.at[path[path.index("layers") + 1]].add(jnp.sum(v))
    return total


# --- AST: learned N:M weight masks ----------------------------------------------------------------

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
        from .layers import WeightMask

        return nnx.split_state(params, WeightMask, ...)[0]

    def _weights_of(self, params) -> dict[tuple, jax.Array]:
        """Each masked weight, keyed by its mask's path."""
        flat = leaves_by_path(params)
        return {p: flat[p[:-1] + ("weight",)] for p in leaves_by_path(self._masks(params))}

    def _new_masks(self, params):
        from .weight_sparsity import nm_mask

        weights = self._weights_of(params)
        return jax.tree_util.tree_map_with_path(
            lambda p, _: nm_mask(jnp.abs(weights[key_path(p)]), self.ws.n, self.ws.m), self._masks(params))

    def _flip(self, old, new) -> jax.Array:
        a, b = leaves_by_path(old), leaves_by_path(new)
        changed = per_layer({p: a[p] != b[p] for p in a}, self.n_layers, self.stacked)
        total = per_layer({p: jnp.ones_like(a[p], jnp.float32) for p in a}, self.n_layers, self.stacked)
        return changed / total

    def adjust_grads(self, grads, params, step):
        from .weight_sparsity import decay_lambda, decayed_grad

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
        from .weight_sparsity import slorb_init

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


# --- knowledge distillation -----------------------------------------------------------------------

def kd_loss_sum(student_logits, teacher_logits, temperature: float, weights=None) -> jax.Array:
    """``Σ_tokens w_t · KL(softmax(t/T) ‖ softmax(s/T)) · T²`` (Hinton et al. 2015; AST's recipe, SEEDS §2)."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1) * temperature ** 2
    return jnp.sum(kl if weights is None else kl * weights)


_NOTED: set[str] = set()  # absent teachers already noted (compile-only compiles several variants)


class Distillation(TrainingMethod):
    """``loss = ce_weight·CE + weight·KD`` with a frozen teacher run in the same jitted step; the teacher
    (a checkpoint or HF directory; any architecture with the student's vocabulary) is read straight into
    shards of the training mesh by its own logical axes and passed as a step constant."""

    name = "distill"

    def __init__(self, cfg: Config):
        self.d = cfg.train.distill
        self.ce_weight = self.d.ce_weight
        self.vocab = cfg.model.vocab_size
        self.student = cfg.model
        self.graphdef = None

    def constants(self, mesh):
        from pathlib import Path

        path = Path(self.d.teacher)
        if not path.is_dir():
            raise ConfigError(f"train.distill.teacher: no such directory {self.d.teacher!r}")
        if (path / "config.json").is_file():
            from .hf import load_pretrained

            model = load_pretrained(path, mesh=mesh)
            vocab = model.config.vocab_size
            self.graphdef, params = nnx.split(model)
        else:
            from .convert import load_checkpoint_model

            tcfg, params, self.graphdef = load_checkpoint_model(str(path), mesh)
            vocab = tcfg.model.vocab_size
        if vocab != self.vocab:
            raise ConfigError(f"train.distill.teacher has vocab_size {vocab}, the student {self.vocab}; they must match")
        return params

    def _teacher_config(self):
        """The teacher's model config: its checkpoint's or HF config; without the directory (planning a
        run elsewhere), the student's architecture without its methods (the dense original)."""
        import json
        from pathlib import Path

        from .config import from_dict

        path = Path(self.d.teacher)
        if (path / "config.json").is_file():
            from .hf import config_from_hf

            return config_from_hf(json.loads((path / "config.json").read_text()))
        if path.is_dir():
            from . import checkpoint as ckpt

            return from_dict(Config, ckpt.read_config(str(path))[0]).model
        if self.d.teacher not in _NOTED:
            _NOTED.add(self.d.teacher)
            print(f"note: train.distill.teacher {self.d.teacher} is not here; compiling with the student's "
                  "architecture as the dense teacher", flush=True)
        return self.student.replace(weight_sparsity=type(self.student.weight_sparsity)(),
                                    **({"lte": type(self.student.lte)()} if hasattr(self.student, "lte") else {}))

    def abstract_constants(self, mesh):
        from .model import Transformer
        from .sharding import state_shardings

        tcfg = self._teacher_config()
        self.graphdef, like = nnx.split(nnx.eval_shape(lambda: Transformer(tcfg, rngs=nnx.Rngs(0))))
        return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), like,
                            state_shardings(like, mesh))

    def loss_terms(self, ctx, teacher_params):
        # fresh Variables at this trace level (the teacher's nnx.remat writes state back to them)
        teacher_model = nnx.merge(self.graphdef, jax.tree.map(lambda x: x, teacher_params))
        teacher = jax.lax.stop_gradient(teacher_model(ctx.inputs, **ctx.kwargs))
        return {"kd": self.d.weight * kd_loss_sum(ctx.logits, teacher, self.d.temperature, ctx.weights)}
