"""Knowledge distillation as a training method: a frozen teacher (checkpoint or HF), the KL term and, as an
option, the layer-wise SquareHead term of AST's code.

SquareHead (Kurtic et al., arXiv 2310.06927) as thu-ml/Adaptive-Sparse-Trainer computes it
(``sparse_modeling.py``, ``Distill_Model.layerwise_loss``): over the residual stream after every block,
``Σ_l mean((s_l − t_l)²) / (mean(t_l²) + ε)``, means over the batch's tokens and features, ε = bfloat16's
machine epsilon 2⁻⁷, the layers summed (not averaged), weight ``hardness_squarehead`` (``train.distill.squarehead``).
The denominator is the teacher's mean square (their code), not its variance. Over micro-batches each one's own
denominator is used, as their gradient accumulation does; SFT target weights weight the tokens.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from ...checkpoints.source import is_hf, load_model, source_config
from ...config import Config
from ...errors import ConfigError
from ...nn.model import Transformer
from ...nn.sharding import state_shardings
from .base import TrainingMethod


def kd_loss_sum(student_logits, teacher_logits, temperature: float, weights=None) -> jax.Array:
    """``Σ_tokens w_t · KL(softmax(t/T) ‖ softmax(s/T)) · T²`` (Hinton et al. 2015; AST's recipe, SEEDS §2)."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1) * temperature ** 2
    return jnp.sum(kl if weights is None else kl * weights)


SQUAREHEAD_EPS = 2.0 ** -7  # torch.finfo(torch.bfloat16).eps, the authors' ε


def squarehead_loss_sum(student_hidden, teacher_hidden, weights=None) -> jax.Array:
    """``N · Σ_l mean_t,d((s_l − t_l)²) / (mean_t,d(t_l²) + ε)`` for hidden states ``[L, batch, seq, dim]``:
    AST's SquareHead term (module docstring) times the ``N = Σ_t w_t`` counted tokens, so the trainer's division
    by the target count gives the authors' value. ``weights``: ``[batch, seq]`` (None: every token counts)."""
    s, t = student_hidden.astype(jnp.float32), teacher_hidden.astype(jnp.float32)
    w = jnp.ones(s.shape[1:3], jnp.float32) if weights is None else weights.astype(jnp.float32)
    n = jnp.sum(w)
    err = jnp.sum(jnp.mean((s - t) ** 2, axis=-1) * w, axis=(1, 2))  # [L]: Σ_t w_t · mean_d (s − t)²
    scale = jnp.sum(jnp.mean(t * t, axis=-1) * w, axis=(1, 2)) / jnp.maximum(n, 1.0)  # [L]: mean t²
    return jnp.sum(err / (scale + SQUAREHEAD_EPS))


_NOTED: set[str] = set()  # absent teachers already noted (compile-only compiles several variants)


class Distillation(TrainingMethod):
    """``loss = ce_weight·CE + weight·KD (+ squarehead·SquareHead)`` with a frozen teacher run in the same
    jitted step; the teacher (a checkpoint or HF directory; any architecture with the student's vocabulary,
    and its depth and width for SquareHead) is read straight into shards of the training mesh by its own
    logical axes and passed as a step constant."""

    name = "distill"

    def __init__(self, cfg: Config):
        self.d = cfg.train.distill
        self.ce_weight = self.d.ce_weight
        self.vocab = cfg.model.vocab_size
        self.student = cfg.model
        self.graphdef = None
        self.needs_stats = self.needs_hidden = self.d.squarehead > 0  # the residual streams of both models

    def _check_layers(self, tcfg):
        if self.d.squarehead > 0 and (tcfg.n_layers, tcfg.dim) != (self.student.n_layers, self.student.dim):
            raise ConfigError(f"train.distill.squarehead compares hidden states layer by layer: the teacher has "
                              f"{tcfg.n_layers} layers of {tcfg.dim}, the student {self.student.n_layers} of "
                              f"{self.student.dim}; they must match")

    def constants(self, mesh):
        path = Path(self.d.teacher)
        if not path.is_dir():
            raise ConfigError(f"train.distill.teacher: no such directory {self.d.teacher!r}")
        model, tcfg = load_model(**{"hf" if is_hf(path) else "ckpt": str(path)}, mesh=mesh,
                                 flags=("train.distill.teacher", "train.distill.teacher"))
        self.graphdef, params = nnx.split(model)
        if tcfg.model.vocab_size != self.vocab:
            raise ConfigError(f"train.distill.teacher has vocab_size {tcfg.model.vocab_size}, the student "
                              f"{self.vocab}; they must match")
        self._check_layers(tcfg.model)
        return params

    def _teacher_config(self):
        """The teacher's model config: its checkpoint's or HF config; without the directory (planning a
        run elsewhere), the student's architecture without its methods (the dense original)."""
        path = Path(self.d.teacher)
        if path.is_dir():
            return source_config(**{"hf" if is_hf(path) else "ckpt": str(path)},
                                 flags=("train.distill.teacher", "train.distill.teacher")).model
        if self.d.teacher not in _NOTED:
            _NOTED.add(self.d.teacher)
            print(f"note: train.distill.teacher {self.d.teacher} is not here; compiling with the student's "
                  "architecture as the dense teacher", flush=True)
        return self.student.replace(weight_sparsity=type(self.student.weight_sparsity)(),
                                    **({"lte": type(self.student.lte)()} if hasattr(self.student, "lte") else {}))

    def abstract_constants(self, mesh):
        tcfg = self._teacher_config()
        self._check_layers(tcfg)
        self.graphdef, like = nnx.split(nnx.eval_shape(lambda: Transformer(tcfg, rngs=nnx.Rngs(0))))
        return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), like,
                            state_shardings(like, mesh))

    def loss_terms(self, ctx, teacher_params):
        # fresh Variables at this trace level (the teacher's nnx.remat writes state back to them)
        teacher_model = nnx.merge(self.graphdef, jax.tree.map(lambda x: x, teacher_params))
        if not self.needs_hidden:
            teacher = jax.lax.stop_gradient(teacher_model(ctx.inputs, **ctx.kwargs))
            return {"kd": self.d.weight * kd_loss_sum(ctx.logits, teacher, self.d.temperature, ctx.weights)}
        teacher, tstats = jax.lax.stop_gradient(teacher_model(ctx.inputs, return_stats=True, return_hidden=True,
                                                              **ctx.kwargs))
        sq = squarehead_loss_sum(ctx.stats["by_layer"]["hidden"], tstats["by_layer"]["hidden"], ctx.weights)
        return {"kd": self.d.weight * kd_loss_sum(ctx.logits, teacher, self.d.temperature, ctx.weights),
                "squarehead": self.d.squarehead * sq}

