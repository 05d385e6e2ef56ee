"""Typed, self-validating configuration dataclasses.

Every check raises :class:`ConfigError` with one line saying what was wrong and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .quant import WEIGHT_BITS
from .sparsity import GRADS, RESCALES, keep_count

ACTIVATIONS = ("relu2", "silu")
DTYPES = ("float32", "bfloat16")
PROJECTION_GROUPS = ("qkv", "out", "gate_up", "down")


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line naming it."""


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

    @classmethod
    def uniform(cls, sparsity: float, **kw) -> "SparsityConfig":
        return cls(qkv=sparsity, out=sparsity, gate_up=sparsity, down=sparsity, **kw)

    def __post_init__(self):
        for g in PROJECTION_GROUPS:
            s = getattr(self, g)
            _require(isinstance(s, (int, float)) and not isinstance(s, bool) and 0.0 <= s < 1.0,
                     f"sparsity.{g} must be a number in [0, 1), got {s!r}")
        bs = self.block_size
        _require(bs is None or (isinstance(bs, int) and not isinstance(bs, bool) and bs >= 1),
                 f"sparsity.block_size must be a positive integer or null, got {bs!r}")
        _require(self.rescale in RESCALES, f"sparsity.rescale must be one of {RESCALES}, got {self.rescale!r}")
        _require(self.grad in GRADS, f"sparsity.grad must be one of {GRADS}, got {self.grad!r}")

    @property
    def enabled(self) -> bool:
        return any(getattr(self, g) > 0 for g in PROJECTION_GROUPS)


@dataclass(frozen=True)
class ModelConfig:
    """Llama-style decoder with Q-Sparse / BitNet options (defaults: a tiny byte-level model)."""

    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: = n_heads (no GQA)
    head_dim: int | None = None  # None: dim // n_heads
    hidden_dim: int = 704  # GLU width (a multiple of 32, for Block Q-Sparse 16:32)
    activation: str = "relu2"  # Q-Sparse default; "silu" for imported Llama/Mistral/Qwen
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    subln: bool = False  # BitNet: RMSNorm before o_proj and before down_proj
    input_norm: bool = False  # BitLinear: parameter-free RMSNorm of every projection input
    act_bits: int | None = None  # 8: per-token absmax int8 activations (Eq. 5–7)
    weight_bits: str | None = None  # "1.58" ternary (Eq. 9–10) or "1"
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    init_std: float = 0.02

    def __post_init__(self):
        if isinstance(self.sparsity, dict):  # allow ModelConfig(sparsity={...})
            object.__setattr__(self, "sparsity", SparsityConfig(**self.sparsity))
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_seq_len"):
            v = getattr(self, name)
            _require(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                     f"model.{name} must be a positive integer, got {v!r}")
        kv = self.kv_heads
        _require(isinstance(kv, int) and kv >= 1 and self.n_heads % kv == 0,
                 f"model.n_kv_heads must divide n_heads={self.n_heads}, got {self.n_kv_heads!r}")
        if self.head_dim is None:
            _require(self.dim % self.n_heads == 0,
                     f"model.n_heads={self.n_heads} must divide dim={self.dim} (or set head_dim)")
        hd = self.head_size
        _require(isinstance(hd, int) and hd >= 2 and hd % 2 == 0,
                 f"model.head_dim must be an even integer >= 2 (RoPE rotates pairs), got {hd!r}")
        _require(self.activation in ACTIVATIONS, f"model.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        _require(self.act_bits in (None, 8), f"model.act_bits must be null or 8, got {self.act_bits!r}")
        _require(self.weight_bits is None or self.weight_bits in WEIGHT_BITS,
                 f"model.weight_bits must be null or one of {WEIGHT_BITS}, got {self.weight_bits!r}")
        for name in ("dtype", "param_dtype"):
            _require(getattr(self, name) in DTYPES, f"model.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        for name in ("norm_eps", "rope_theta", "init_std"):
            v = getattr(self, name)
            _require(isinstance(v, (int, float)) and v > 0, f"model.{name} must be a positive number, got {v!r}")
        sp = self.sparsity
        for group, d in self.group_input_dims().items():
            s = getattr(sp, group)
            if s == 0:
                continue
            span = d
            if sp.block_size is not None:
                _require(d % sp.block_size == 0,
                         f"model.sparsity.block_size={sp.block_size} must divide the {group} input size {d}")
                span = sp.block_size
            try:
                keep_count(span, s)
            except ValueError as e:
                raise ConfigError(f"model.sparsity.{group}: {e}") from None

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads if self.head_dim is None else self.head_dim

    def group_input_dims(self) -> dict[str, int]:
        """Input feature size of each projection group."""
        return {"qkv": self.dim, "out": self.n_heads * self.head_size, "gate_up": self.dim, "down": self.hidden_dim}

    def keep(self, group: str) -> int | None:
        """Entries kept per row (or per block) at a group's input; None when the group is dense."""
        s = getattr(self.sparsity, group)
        if s == 0:
            return None
        span = self.sparsity.block_size or self.group_input_dims()[group]
        return keep_count(span, s)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)
