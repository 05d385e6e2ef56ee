"""Training methods (AST, distillation, LTE) and :func:`methods_for`, which builds them from a config.
"""

from __future__ import annotations

from ...config import Config
from .ast import AdaptiveSparseTraining
from .base import TrainingMethod
from .distill import Distillation
from .lte import LTEMethod


def methods_for(cfg: Config) -> list[TrainingMethod]:
    out: list[TrainingMethod] = []
    if cfg.model.weight_sparsity.enabled:
        out.append(AdaptiveSparseTraining(cfg))
    lte = getattr(cfg.model, "lte", None)
    if lte is not None and lte.enabled:
        out.append(LTEMethod(cfg))
    if cfg.train.distill.enabled:
        out.append(Distillation(cfg))
    return out

