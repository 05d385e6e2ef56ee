"""Typed, self-validating configuration dataclasses, read from YAML plus ``key=value`` overrides.

Every check raises :class:`ConfigError` with one line saying what was wrong and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field

import yaml

from .errors import ConfigError
from .ops.quant import WEIGHT_BITS
from .config_model import (LTE_EFFICIENCY, LTE_EXECUTION, LTE_MODES, PROJECTION_GROUPS, ROPE_TYPES, LTEConfig,  # noqa: F401
                           RopeScaling, SparsityConfig, WeightSparsityConfig, _require)
from .ops.topk import keep_count

ACTIVATIONS = ("relu2", "silu")
KERNELS = ("off", "on", "xla", "pallas", "interpret")  # on: Pallas on GPU/TPU, XLA int8 path on CPU
DTYPES = ("float32", "bfloat16")
ATTENTION = ("auto", "xla", "chunked", "cudnn", "flash")  # attention.IMPLS
REMAT = ("none", "full", "dots", "dots_topk")  # nn.model.REMAT_POLICIES
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
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    sliding_window: int | None = None  # Mistral: a query sees the last `sliding_window` positions
    subln: bool = False  # BitNet: RMSNorm before o_proj and before down_proj
    input_norm: bool = False  # BitLinear: parameter-free RMSNorm of every projection input
    act_bits: int | None = None  # 8: per-token absmax int8 activations (Eq. 5–7)
    weight_bits: str | None = None  # "1.58" ternary (Eq. 9–10) or "1"
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    weight_sparsity: WeightSparsityConfig = field(default_factory=WeightSparsityConfig)  # AST N:M weights
    lte: LTEConfig = field(default_factory=LTEConfig)  # LTE experts + routers (lte.py)
    scan_layers: bool = False  # one stacked Block under nnx.scan: compile time independent of depth
    remat: str = "none"  # activation checkpointing per block: none | full | dots (keep weight matmuls) | dots_topk
    # (dots, and keep the top-K selections' outputs: no selection in the backward pass)
    kernels: str = "off"  # projections through kernels.qsparse_matmul (1.58-bit weights, int8 activations)
    attention: str = "auto"  # auto | xla | chunked | cudnn | flash (attention.py): auto = flash on TPU, cuDNN on GPU
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    init_std: float = 0.02

    def __post_init__(self):
        for name, cls in (("sparsity", SparsityConfig), ("weight_sparsity", WeightSparsityConfig),
                          ("rope_scaling", RopeScaling)):  # allow ModelConfig(sparsity={...})
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, cls(**getattr(self, name)))
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_seq_len"):
            _require(isinstance(v := getattr(self, name), int) and not isinstance(v, bool) and v >= 1,
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
        _require(self.sliding_window is None or self.sliding_window >= 1,
                 f"model.sliding_window must be a positive integer or null, got {self.sliding_window!r}")
        _require(self.remat in REMAT, f"model.remat must be one of {', '.join(REMAT)}, got {self.remat!r}")
        _require(self.kernels in KERNELS, f"model.kernels must be one of {KERNELS}, got {self.kernels!r}")
        _require(self.attention in ATTENTION, f"model.attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.kernels != "off":
            _require(self.weight_bits == "1.58" and self.act_bits == 8,
                     "model.kernels needs a 1.58-bit model with int8 activations (weight_bits '1.58', act_bits 8), "
                     f"got weight_bits {self.weight_bits!r}, act_bits {self.act_bits!r}")
            _require(self.sparsity.rescale == "none" and self.sparsity.grad == "ste",
                     "model.kernels implement rescale 'none' with the 'ste' gradient only")
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
        ws = self.weight_sparsity
        if ws.enabled:
            for group, d in self.group_input_dims().items():
                _require(d % ws.m == 0, f"model.weight_sparsity.m={ws.m} must divide the {group} input size {d}")
                _require(not ws.slorb or d % ws.slorb_group == 0,
                         f"model.weight_sparsity.slorb_group={ws.slorb_group} must divide the {group} input size {d}")

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


SCHEDULES = ("cosine", "polynomial", "constant", "two_stage")


@dataclass(frozen=True)
class MixtureSource:
    """One prepared corpus of a mixture and its sampling weight (weights are normalized)."""

    source: str = ""
    weight: float = 1.0
    name: str | None = None  # in metrics; default: the directory's name

    def __post_init__(self):
        _require(bool(self.source), "data.mixture: every entry needs a source (a prepared directory)")
        _require(self.weight > 0, f"data.mixture: weight must be positive, got {self.weight!r} for {self.source!r}")

    @property
    def label(self) -> str:
        return self.name or os.path.basename(os.path.normpath(self.source))


@dataclass(frozen=True)
class DataConfig:
    """Where tokens come from. ``source: stdlib`` is the embedded corpus (the Python standard
    library's own ``.py`` files), present on every machine; a directory written by
    ``qsparse prepare`` (memory-mapped, nothing tokenized at start); or a file or
    directory of text, JSONL (``text_field``), Parquet or ArrayRecord files, tokenized in memory at
    start. ``mixture`` samples from several prepared directories in proportion to their weights."""

    source: str = "stdlib"
    mixture: list[MixtureSource] = field(default_factory=list)
    task: str = "lm"  # lm: next-token on everything; sft: prompt/response or chat JSONL, loss on responses
    format: str = "auto"  # auto | text | jsonl | parquet | arrayrecord
    text_field: str = "text"
    tokenizer: str = "byte"  # byte, or a path to a HF tokenizer.json
    seq_len: int = 256
    batch_size: int = 16  # global, in sequences
    val_fraction: float | None = None  # of documents, by a hash of their name; None: 0.02, or a prepared corpus's own
    seed: int = 0
    read_threads: int = 2  # grain threads reading batches ahead of the step
    prefetch: int = 4  # batches buffered ahead of the step

    def __post_init__(self):
        _require(self.task in ("lm", "sft"), f"data.task must be one of lm, sft, got {self.task!r}")
        _require(self.format in ("auto", "text", "jsonl", "parquet", "arrayrecord"),
                 f"data.format must be one of auto, text, jsonl, parquet, arrayrecord, got {self.format!r}")
        for name in ("seq_len", "batch_size"):
            _require((v := getattr(self, name)) >= 1, f"data.{name} must be a positive integer, got {v!r}")
        _require(self.read_threads >= 0, f"data.read_threads must be >= 0, got {self.read_threads!r}")
        _require(self.prefetch >= 0, f"data.prefetch must be >= 0, got {self.prefetch!r}")
        _require(self.val_fraction is None or 0 < self.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {self.val_fraction!r}")
        _require(bool(self.source), "data.source must name the corpus: 'stdlib' or a path")
        if self.mixture:
            _require(self.source == "stdlib", "set data.source or data.mixture, not both")
            _require(self.task == "lm", "data.mixture is for data.task=lm")
            labels = [m.label for m in self.mixture]
            _require(len(set(labels)) == len(labels), f"data.mixture: names must differ, got {labels} (set name:)")

    @classmethod
    def for_model(cls, model: "ModelConfig", tokenizer: str = "byte") -> "DataConfig":
        """The data of a model that comes without any (HF): the default window cut to its ``max_seq_len``."""
        return cls(tokenizer=tokenizer, seq_len=min(cls.seq_len, model.max_seq_len))


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup then cosine / polynomial / constant decay, or BitNet's two-stage schedule
    (``lr`` → ``lr2`` and ``weight_decay`` → ``weight_decay2`` at ``stage2_at`` of training)."""

    lr: float = 3e-3
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    schedule: str = "cosine"
    warmup_steps: int = 100
    warmup_fraction: float | None = None  # set: warmup = this fraction of the steps (overrides warmup_steps)
    end_lr_ratio: float = 0.1  # final lr / peak lr
    power: float = 1.0  # polynomial decay exponent
    lr2: float | None = None  # two_stage: second-stage peak lr
    weight_decay2: float = 0.0  # two_stage: second-stage weight decay
    stage2_at: float = 0.5  # two_stage: fraction of steps
    grad_accum: int = 1

    def __post_init__(self):
        _require(self.schedule in SCHEDULES, f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _require(self.lr > 0, f"optim.lr must be positive, got {self.lr!r}")
        _require(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"optim.b1 and optim.b2 must be in [0, 1), got {self.b1}, {self.b2}")
        _require(self.weight_decay >= 0 and self.weight_decay2 >= 0, "optim.weight_decay must be >= 0")
        _require(self.clip_norm is None or self.clip_norm > 0, f"optim.clip_norm must be positive or null, got {self.clip_norm!r}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        _require(self.warmup_fraction is None or 0 <= self.warmup_fraction < 1,
                 f"optim.warmup_fraction must be in [0, 1) or null, got {self.warmup_fraction!r}")
        _require(0 <= self.end_lr_ratio <= 1, f"optim.end_lr_ratio must be in [0, 1], got {self.end_lr_ratio!r}")
        _require(0 < self.stage2_at < 1, f"optim.stage2_at must be in (0, 1), got {self.stage2_at!r}")
        _require(self.grad_accum >= 1, f"optim.grad_accum must be a positive integer, got {self.grad_accum!r}")
        _require(self.schedule != "two_stage" or self.lr2 is not None, "optim.lr2 must be set for schedule two_stage")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; one of them may be -1 for "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        _require(all(s == -1 or s >= 1 for s in sizes), f"mesh sizes must be positive or -1, got {sizes}")
        _require(sum(s == -1 for s in sizes) <= 1, f"at most one mesh axis may be -1, got {sizes}")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500  # steps; 0 disables periodic saves (a final one is still written)
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        _require(self.every >= 0, f"checkpoint.every must be >= 0, got {self.every!r}")
        _require(self.keep >= 1, f"checkpoint.keep must be >= 1, got {self.keep!r}")


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation from a frozen teacher (a checkpoint or HF directory), in the same step:
    ``loss = ce_weight·CE + weight·KL(softmax(t/T) ‖ softmax(s/T))·T²`` per token (AST's recipe: 1, 0.5, T=2)."""

    teacher: str | None = None  # a run's checkpoints directory, a step of it, or an HF model directory
    weight: float = 0.5
    ce_weight: float = 1.0
    temperature: float = 2.0
    squarehead: float = 0.0  # weight of AST's layer-wise SquareHead term (Σ_l MSE_l / teacher mean square_l)

    def __post_init__(self):
        for name in ("weight", "ce_weight", "squarehead"):
            v = getattr(self, name)
            _require(isinstance(v, (int, float)) and v >= 0, f"train.distill.{name} must be a number >= 0, got {v!r}")
        _require(isinstance(self.temperature, (int, float)) and self.temperature > 0,
                 f"train.distill.temperature must be a positive number, got {self.temperature!r}")

    @property
    def enabled(self) -> bool:
        return self.teacher is not None


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    epochs: float | None = None  # set: steps = ceil(epochs · train rows / batch_size), overriding steps
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self):
        for name in ("steps", "log_every", "eval_every", "eval_batches"):
            _require((v := getattr(self, name)) >= 1, f"train.{name} must be a positive integer, got {v!r}")
        _require(self.epochs is None or self.epochs > 0, f"train.epochs must be positive or null, got {self.epochs!r}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self):
        _require(self.data.seq_len <= self.model.max_seq_len,
                 f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        _require(self.data.tokenizer != "byte" or self.model.vocab_size >= 256,
                 f"model.vocab_size must be >= 256 for the byte tokenizer, got {self.model.vocab_size}")


def _coerce(value, tp, key: str):
    """Check ``value`` against annotation ``tp`` (int, float, bool, str, X | None, dataclass)."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if typing.get_origin(tp) is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {getattr(tp, '__name__', tp)} fields, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:  # YAML 1.1 booleans
            return _BOOL_WORDS[value.lower()]
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads weight_bits: 1.58 as a number
    else:
        return value
    raise ConfigError(f"{key} must be {'a' if tp is not int else 'an'} {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict; an unknown key or a wrong type is a ConfigError."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}{k}' (allowed under '{prefix.rstrip('.') or 'top level'}': "
                              f"{', '.join(names)})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # e.g. a comparison against a wrongly typed value inside validation
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


class _Loader(yaml.SafeLoader):
    """YAML with the 1.2 booleans: only true / false are booleans, so ``kernels: on`` (a word our options
    use) stays the string ``on``; a bool key still takes yes / no / on / off (``_coerce``)."""


_Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "tTfF":
    _Loader.yaml_implicit_resolvers.setdefault(_first, []).insert(
        0, ("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")))
_BOOL_WORDS = {"yes": True, "on": True, "true": True, "no": False, "off": False, "false": False}


def _yaml(text):
    return yaml.load(text, Loader=_Loader)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. optim.lr=1e-3")
        try:
            value = _yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node, parts = data, key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """YAML file (or defaults when ``path`` is None) plus ``key=value`` overrides → validated Config."""
    data: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                data = _yaml(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    _release_mesh_axis(data, list(overrides), path)
    return from_dict(Config, apply_overrides(data, list(overrides)))


def _release_mesh_axis(data: dict, overrides: list[str], path: str | None):
    """``mesh.X=-1`` given ("all devices on X") takes them from the axis the file (or the defaults: ``mesh.data``)
    sets to -1, which becomes 1 with a note on stderr; two -1 overrides stay an error."""
    given = [o.partition("=")[0].strip() for o in overrides]
    wild = [k for k, o in zip(given, overrides) if re.fullmatch(r"mesh\.\w+=\s*-1\s*", o)]
    for axis in ("data", "fsdp", "tensor") if wild and isinstance(mesh := data.get("mesh", {}), dict) else ():
        if f"mesh.{axis}" not in given and mesh.get(axis, getattr(MeshConfig, axis)) == -1:
            where = f"-1 in {path}" if axis in mesh else "-1 by default"
            mesh = data["mesh"] = {**mesh, axis: 1}
            print(f"note: {wild[0]}=-1 takes all devices, so mesh.{axis} ({where}) is 1", file=sys.stderr)


def check_inputs(cfg: Config, flags: dict[str, str | None] | None = None):
    """The files a run reads (data.source / data.tokenizer unless ``stdlib`` / ``byte``, data.mixture sources,
    train.distill.teacher; ``flags``: e.g. ``{"--init_from": path}``) exist, else one line naming the resolved
    path (a relative one is read from the current directory, as any argument is). Call it before writing."""
    d = cfg.data
    paths = {"data.source": d.source != "stdlib" and d.source, "data.tokenizer": d.tokenizer != "byte" and d.tokenizer,
             "train.distill.teacher": cfg.train.distill.teacher, **(flags or {}),
             **{f"data.mixture[{i}].source": m.source for i, m in enumerate(d.mixture)}}
    for key, p in paths.items():
        if p and not os.path.exists(full := os.path.abspath(os.path.expanduser(p))):
            rel = "" if os.path.isabs(os.path.expanduser(p)) else f" ({p} read from the current directory)"
            raise ConfigError(f"{key}: no such file or directory {full}{rel}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
