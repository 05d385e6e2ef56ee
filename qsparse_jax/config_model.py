"""The model config's sections below the model itself: top-K sparsity, AST weight sparsity, LTE, RoPE scaling.

Typed, frozen, self-validating dataclasses (``config.py`` holds the tree above them and the YAML
loading; it re-exports these). Every check raises :class:`ConfigError` with one line.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .ops.topk import GRADS, RESCALES, SELECTS

PROJECTION_GROUPS = ("qkv", "out", "gate_up", "down")


def _require(ok: bool, msg: str):
    if not ok:
        raise ConfigError(msg)


@dataclass(frozen=True)
class SparsityConfig:
    """Top-K sparsity of each projection group's input (Q-Sparse Table 2 groups).

    A group's sparsity S keeps ``k = int((1 − S) · D)`` of its D input features per token, or with
    ``block_size=M`` ``int((1 − S) · M)`` per block of M (Block Q-Sparse N:M).
    """

    qkv: float = 0.0
    out: float = 0.0
    gate_up: float = 0.0
    down: float = 0.0
    block_size: int | None = None
    rescale: str = "none"
    grad: str = "ste"
    select: str = "auto"  # auto: fused Pallas selection on TPU, XLA search elsewhere; xla; fused (a kernel required:
    # TPU, or GPU rows, nn/selection.py); statistical (approximate)

    @classmethod
    def uniform(cls, sparsity: float, **kw) -> "SparsityConfig":
        return cls(qkv=sparsity, out=sparsity, gate_up=sparsity, down=sparsity, **kw)

    def __post_init__(self):
        for g in PROJECTION_GROUPS:
            s = getattr(self, g)
            _require(isinstance(s, (int, float)) and not isinstance(s, bool) and 0.0 <= s < 1.0,
                     f"model.sparsity.{g} must be a number in [0, 1), got {s!r}")
        bs = self.block_size
        _require(bs is None or (isinstance(bs, int) and not isinstance(bs, bool) and bs >= 1),
                 f"model.sparsity.block_size must be a positive integer or null, got {bs!r}")
        _require(self.rescale in RESCALES, f"model.sparsity.rescale must be one of {RESCALES}, got {self.rescale!r}")
        _require(self.grad in GRADS, f"model.sparsity.grad must be one of {GRADS}, got {self.grad!r}")
        _require(self.select in SELECTS, f"model.sparsity.select must be one of {SELECTS}, got {self.select!r}")
        _require(self.select != "statistical" or (bs is None and self.rescale == "none" and self.grad == "ste"),
                 "model.sparsity.select=statistical goes with block_size null, rescale none and grad ste")

    @property
    def enabled(self) -> bool:
        return any(getattr(self, g) > 0 for g in PROJECTION_GROUPS)


@dataclass(frozen=True)
class WeightSparsityConfig:
    """AST (arXiv 2407.20584, SEEDS §2): N:M weight sparsity of every block linear, masks learned in training.

    Forward ``W ⊙ M`` with a straight-through backward; masks re-chosen from ``|W|`` every ``mask_every``
    optimizer steps (0: the mask stays fixed); annealed decay ``λ(t)·(¬M)⊙W`` added to the gradient,
    ``λ(t) = min(decay_rate·t, decay_max)`` (the paper's LLaMA run: 2e-8 per step up to 6e-5 at step 3000);
    SLoRB ``y += S·(X x)`` over groups of ``slorb_group`` inputs when ``slorb``.
    """

    n: int = 0  # kept per group; 0: off
    m: int = 4
    mask_every: int = 10
    decay_rate: float = 2e-8
    decay_max: float = 6e-5
    slorb: bool = False
    slorb_group: int = 16
    slorb_train_x: bool = False  # X (the per-group input sums) trainable too
    score: str = "magnitude"  # mask score in AST: magnitude |W| | wanda |W|·‖x_j‖ (norms from act_norms)
    act_norms: str | None = None  # wanda: .npz of each linear's calibration ‖x_j‖ (methods.ast.save_act_norms)
    source: str | None = None  # the dense original (default train.distill.teacher): S at a one-shot-pruned start
    decay_after_clip: bool = True  # the authors' order: clip, then + λ(¬M)⊙W; false: decay, then clip

    def __post_init__(self):
        _require(isinstance(self.m, int) and self.m >= 2, f"model.weight_sparsity.m must be an integer >= 2, got {self.m!r}")
        _require(isinstance(self.n, int) and 0 <= self.n < self.m,
                 f"model.weight_sparsity.n must be an integer in [0, m={self.m}) (0: off), got {self.n!r}")
        _require(isinstance(self.mask_every, int) and self.mask_every >= 0,
                 f"model.weight_sparsity.mask_every must be an integer >= 0 (0: fixed mask), got {self.mask_every!r}")
        for name in ("decay_rate", "decay_max"):
            v = getattr(self, name)
            _require(isinstance(v, (int, float)) and v >= 0, f"model.weight_sparsity.{name} must be >= 0, got {v!r}")
        _require(self.score in ("magnitude", "wanda"), f"model.weight_sparsity.score must be magnitude or wanda, got {self.score!r}")
        _require(isinstance(self.slorb_group, int) and self.slorb_group >= 1,
                 f"model.weight_sparsity.slorb_group must be a positive integer, got {self.slorb_group!r}")

    @property
    def enabled(self) -> bool:
        return self.n > 0


LTE_MODES = ("lte", "moefication")
LTE_EFFICIENCY = ("mean", "mean_square")
LTE_EXECUTION = ("masked", "gather")


@dataclass(frozen=True)
class LTEConfig:
    """LTE (arXiv 2402.06126, SEEDS §3): the FFN's neurons in experts of ``expert_size``, a sigmoid router
    per FFN. ``stage`` 1: output ``Σ G_i·E_i(x)``, loss + ``eta``·efficiency + ``separability``·separability;
    2: hard ``G > tau``, routers frozen. ``mode: moefication``: the ``top_k`` best-scored experts (routers
    fit to a dense model). ``execution: gather`` computes only the selected experts (inference); see lte.py.
    """

    enabled: bool = False
    expert_size: int = 32
    mode: str = "lte"
    stage: int = 1
    tau: float = 0.5
    eta: float = 0.0  # efficiency-loss weight: sets the sparsity
    efficiency: str = "mean"  # mean router score | mean_square
    separability: float = 0.1  # separability-loss weight
    sep_eps: float = 0.01  # separability loss eps/((G-tau)^2+eps)
    top_k: int | None = None  # moefication: experts kept per token
    execution: str = "masked"

    def __post_init__(self):
        p = "model.lte."
        _require(isinstance(self.expert_size, int) and not isinstance(self.expert_size, bool) and self.expert_size >= 1,
                 f"{p}expert_size must be a positive integer, got {self.expert_size!r}")
        _require(self.mode in LTE_MODES, f"{p}mode must be one of {LTE_MODES}, got {self.mode!r}")
        _require(self.stage in (1, 2), f"{p}stage must be 1 (soft scores, routers trained) or 2 (hard, routers frozen), "
                 f"got {self.stage!r}")
        _require(isinstance(self.tau, (int, float)) and 0 < self.tau < 1, f"{p}tau must be in (0, 1), got {self.tau!r}")
        for name in ("eta", "separability"):
            _require(isinstance(v := getattr(self, name), (int, float)) and not isinstance(v, bool) and v >= 0,
                     f"{p}{name} must be a number >= 0, got {v!r}")
        _require(isinstance(self.sep_eps, (int, float)) and self.sep_eps > 0, f"{p}sep_eps must be positive, got {self.sep_eps!r}")
        _require(self.efficiency in LTE_EFFICIENCY, f"{p}efficiency must be one of {LTE_EFFICIENCY}, got {self.efficiency!r}")
        _require(self.execution in LTE_EXECUTION, f"{p}execution must be one of {LTE_EXECUTION}, got {self.execution!r}")
        k = self.top_k
        _require(k is None or (isinstance(k, int) and not isinstance(k, bool) and k >= 1),
                 f"{p}top_k must be a positive integer or null, got {k!r}")
        _require(self.mode != "moefication" or k is not None, f"{p}mode moefication needs top_k (experts kept per token)")


ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling for long-context checkpoints, as HF ``rope_parameters`` define it.

    ``linear``: ``inv_freq / factor``; ``llama3``: Llama 3.1's wavelength-banded interpolation
    (``factor``, ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``);
    ``yarn``: YaRN's ramp between interpolation and extrapolation (``beta_fast``, ``beta_slow``) with
    cos/sin scaled by ``attention_factor`` (default ``0.1·ln(factor) + 1``, or the mscale ratio).
    ``original_max_position_embeddings`` null means the model's ``max_seq_len``.
    """

    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        _require(self.type in ROPE_TYPES, f"model.rope_scaling.type must be one of {ROPE_TYPES}, got {self.type!r}")
        _require(self.factor > 0, f"model.rope_scaling.factor must be positive, got {self.factor!r}")
        _require(self.type != "llama3" or self.high_freq_factor > self.low_freq_factor > 0,
                 "model.rope_scaling: llama3 needs high_freq_factor > low_freq_factor > 0, got "
                 f"{self.high_freq_factor}, {self.low_freq_factor}")
        om = self.original_max_position_embeddings
        _require(om is None or om >= 1, f"model.rope_scaling.original_max_position_embeddings must be positive, got {om!r}")
