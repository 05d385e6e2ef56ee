"""How a training method meets the trainer: one small interface, :class:`TrainingMethod`.

The loop in ``train/loop.py`` knows no method by name. A method may

- add loss terms (``loss_terms``): SUMS over the counted target tokens, added to the NLL sum, so
  batches and gradient-accumulation micro-batches combine exactly; each is reported per token by name;
- scale the cross-entropy (``ce_weight``; distillation's ``CE`` weight);
- ask for the model's per-layer statistics (``needs_stats``: ``apply(..., return_stats=True)``);
- pass constants into the jitted step (``constants``: e.g. a frozen teacher's parameters, sharded on
  the training mesh, never donated, never updated);
- adjust gradients before clipping (``adjust_grads``) or after it, just before AdamW (``adjust_clipped``:
  AST's annealed decay, after clipping as the authors add it);
- exclude the parameters it adds from weight decay (``no_decay``: LTE's routers, AST's SLoRB);
- ask for the residual stream after every block (``needs_hidden``: ``stats["by_layer"]["hidden"]``, SquareHead);
- check and fill loaded weights on the host before a start from them (``before_start``: AST's SLoRB ``S``
  from the dense original at a one-shot-pruned start);
- freeze parameters (``frozen``: zero gradient and zero update, so they stay bit-identical);
- refresh model state on a schedule inside the jitted step, after the update (``refresh``: AST's masks);
- keep its own state in the train state (``init_state`` / ``state_shardings``; checkpointed with it);
- prepare parameters on a fresh start, after ``--init_from`` (``prepare``: AST's masks from the loaded weights);
  the leaves it adds to a model (``adds``: names such as ``mask``) may be missing from that checkpoint;
- add host-side metrics at log steps (``log_metrics``).

``train.methods.methods_for`` builds the list from a config: AST (``model.weight_sparsity``, ``ast.py``),
distillation (``train.distill``, ``distill.py``), LTE (``model.lte``, ``lte.py``).

Parameters are the model's whole ``nnx.State``; only ``nnx.Param`` leaves are differentiated and
optimized (model state such as AST's ``WeightMask`` is carried, not trained).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp


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
    needs_hidden = False  # with needs_stats: the residual stream after each block in stats["by_layer"]["hidden"]
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
        """Gradients (of the trainable state) before global-norm clipping."""
        return grads

    def adjust_clipped(self, grads, params, step):
        """Gradients after global-norm clipping, as AdamW receives them."""
        return grads

    def no_decay(self, trainable) -> Any | None:
        """A pytree of bools over the trainable ``nnx.Param`` state (True: no weight decay), or None. The
        parameters a method adds are excluded unless its paper says otherwise."""
        return None

    def before_start(self, params, mesh):
        """Host side, before the jitted ``prepare`` of a start from loaded weights (``--init_from``): may check
        their values (one-line errors) and fill what needs data from elsewhere. Returns the params."""
        return params

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

