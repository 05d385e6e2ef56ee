"""Hugging Face interop for Llama, Mistral and Qwen2 checkpoints, without torch.

``load_pretrained(path, **overrides)`` reads a local directory (``config.json`` and one or
index-sharded ``*.safetensors``) into a :class:`Transformer`; overrides set any ``ModelConfig`` field
(for Q-Sparse continued training: ``sparsity=SparsityConfig.uniform(0.4)``). With ``mesh`` each
tensor is read slice by slice straight into its shards, so no host ever holds a whole 7B model.
``save_pretrained(model, path)`` writes a directory ``transformers`` loads with
``AutoModelForCausalLM.from_pretrained``. HF stores linear weights [out, in]; we store [in, out].
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ROPE_TYPES, ConfigError, ModelConfig, RopeScaling
from .model import Transformer

SUPPORTED = ("llama", "mistral", "qwen2")


class HFError(ConfigError):
    """An HF checkpoint is unsupported, incomplete or malformed (one line naming the problem)."""


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """ModelConfig from an HF ``config.json`` dict (SiLU GLU kept, as for continued training)."""
    mtype = hf.get("model_type")
    if mtype not in SUPPORTED:
        raise HFError(f"unsupported model_type {mtype!r}; supported: {', '.join(SUPPORTED)}")
    # transformers >= 5 writes rope_parameters; older configs rope_theta (+ rope_scaling)
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = _rope_scaling(rope, hf)
    if hf.get("hidden_act", "silu") != "silu":
        raise HFError(f"unsupported hidden_act {hf.get('hidden_act')!r}; supported: silu")
    heads = hf["num_attention_heads"]
    window = hf.get("sliding_window") if (mtype == "mistral" or hf.get("use_sliding_window")) else None
    kw = dict(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
              n_kv_heads=hf.get("num_key_value_heads", heads), head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
              hidden_dim=hf["intermediate_size"], activation="silu", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
              rope_theta=float(theta), max_seq_len=hf.get("max_position_embeddings", 2048),
              tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=mtype == "qwen2",
              sliding_window=window, rope_scaling=scaling)
    kw.update(overrides)
    return ModelConfig(**kw)


_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "beta_fast",
              "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")


def _rope_scaling(rope: dict, hf: dict) -> RopeScaling:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise HFError(f"RoPE type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0 or hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFError("partial_rotary_factor != 1 is not supported (RoPE rotates the whole head here)")
    kw = {k: rope[k] for k in _ROPE_KEYS if rope.get(k) is not None}
    if kind in ("llama3", "yarn"):  # transformers falls back to max_position_embeddings
        kw.setdefault("original_max_position_embeddings",
                      hf.get("original_max_position_embeddings", hf.get("max_position_embeddings", 2048)))
    if kind == "yarn" and "factor" not in kw:
        kw["factor"] = hf.get("max_position_embeddings", 2048) / kw["original_max_position_embeddings"]
    try:
        return RopeScaling(type=kind, **kw)
    except (ConfigError, TypeError) as e:
        raise HFError(f"rope_parameters: {e}") from None


def _rope_parameters(c: ModelConfig) -> dict:
    r = c.rope_scaling
    out = {"rope_type": r.type, "rope_theta": c.rope_theta}
    if r.type != "default":
        out["factor"] = r.factor
    if r.type == "llama3":
        out.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor)
    if r.type == "yarn":
        out.update(beta_fast=r.beta_fast, beta_slow=r.beta_slow, truncate=r.truncate,
                   **{k: getattr(r, k) for k in ("attention_factor", "mscale", "mscale_all_dim") if getattr(r, k) is not None})
    if r.type in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = r.original_max_position_embeddings or c.max_seq_len
    return out


def hf_names(cfg: ModelConfig) -> dict[tuple, tuple[str, bool]]:
    """Our parameter path → (HF tensor name, transposed?)."""
    names: dict[tuple, tuple[str, bool]] = {("embed",): ("model.embed_tokens.weight", False),
                                            ("norm", "weight"): ("model.norm.weight", False)}
    if not cfg.tie_embeddings:
        names[("lm_head",)] = ("lm_head.weight", True)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        names[("layers", i, "attn_norm", "weight")] = (p + "input_layernorm.weight", False)
        names[("layers", i, "mlp_norm", "weight")] = (p + "post_attention_layernorm.weight", False)
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            names[("layers", i, "attn", ours, "weight")] = (p + f"self_attn.{theirs}.weight", True)
            if cfg.qkv_bias and ours != "wo":
                names[("layers", i, "attn", ours, "bias")] = (p + f"self_attn.{theirs}.bias", False)
        for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
            names[("layers", i, "mlp", ours, "weight")] = (p + f"mlp.{theirs}.weight", True)
    return names


class _Tensors:
    """Lazy access to the tensors of one or index-sharded safetensors files."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.exists():
            files = {name: path / f for name, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            single = sorted(path.glob("*.safetensors"))
            if not single:
                raise HFError(f"no *.safetensors in {path}")
            files = {}
            for f in single:
                with safe_open(str(f), framework="flax") as h:
                    files.update({k: f for k in h.keys()})
        self.files = files
        self._open = {}
        self._safe_open = safe_open

    def handle(self, name: str):
        if name not in self.files:
            raise HFError(f"missing tensor {name!r} in the checkpoint")
        f = self.files[name]
        if f not in self._open:
            self._open[f] = self._safe_open(str(f), framework="flax")
        return self._open[f]

    def shape(self, name: str) -> tuple:
        return tuple(self.handle(name).get_slice(name).get_shape())

    def read(self, name: str, index=None) -> np.ndarray:
        sl = self.handle(name).get_slice(name)
        return np.asarray(sl[index] if index is not None else sl[:])


def load_pretrained(path: str | Path, *, mesh=None, dtype: str | None = None, **overrides) -> Transformer:
    """A Transformer with an HF Llama / Mistral / Qwen2 checkpoint's weights (see module docstring)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise HFError(f"no config.json in {path}")
    try:
        cfg = config_from_hf(json.loads((path / "config.json").read_text()), **overrides)
    except KeyError as e:
        raise HFError(f"config.json in {path} lacks {e.args[0]!r}") from None
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype)
    tensors = _Tensors(path)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    shardings = None
    if mesh is not None:
        from .sharding import state_shardings

        shardings = dict(nnx.to_flat_state(state_shardings(abstract, mesh)))
    flat = dict(nnx.to_flat_state(abstract))
    names = hf_names(cfg)
    for key, var in flat.items():
        if key not in names:
            raise HFError(f"no HF tensor maps to parameter {'/'.join(map(str, key))}")
        name, transposed = names[key]
        shape = tensors.shape(name)
        want = tuple(reversed(var.shape)) if transposed else tuple(var.shape)
        if shape != want:
            raise HFError(f"tensor {name!r} has shape {list(shape)}, expected {list(want)} for this config")
        pdt = jnp.dtype(cfg.param_dtype)

        def read(index, name=name, transposed=transposed):
            if index is None:
                a = tensors.read(name)
            else:  # read only this shard's slice
                a = tensors.read(name, tuple(reversed(index)) if transposed else index)
            return (a.T if transposed else a).astype(pdt)

        if shardings is None:
            value = jnp.asarray(read(None))
        else:
            sh = shardings[key].get_value() if isinstance(shardings[key], nnx.Variable) else shardings[key]
            value = jax.make_array_from_callback(var.shape, sh, read)
        var.set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def hf_config(model: Transformer, model_type: str | None = None) -> dict:
    c = model.config
    mtype = model_type or ("qwen2" if c.qkv_bias else "mistral" if c.sliding_window else "llama")
    if mtype not in SUPPORTED:
        raise HFError(f"unsupported model_type {mtype!r}; supported: {', '.join(SUPPORTED)}")
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[mtype]
    out = {"architectures": [arch], "model_type": mtype, "vocab_size": c.vocab_size, "hidden_size": c.dim,
           "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
           "num_key_value_heads": c.kv_heads, "head_dim": c.head_size, "hidden_act": "silu",
           "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
           "rope_parameters": _rope_parameters(c),
           "tie_word_embeddings": c.tie_embeddings, "torch_dtype": "float32"}
    if mtype == "mistral":
        out["sliding_window"] = c.sliding_window
    if mtype == "llama":
        out["attention_bias"] = False
        out["mlp_bias"] = False
    return out


def save_pretrained(model: Transformer, path: str | Path, *, model_type: str | None = None):
    """Write ``config.json`` + ``model.safetensors`` (float32, dense weights) loadable by transformers."""
    from safetensors.numpy import save_file

    c = model.config
    if c.activation != "silu" or c.subln or c.input_norm:
        raise HFError("only SiLU-GLU models without SubLN / input norms map onto llama / mistral / qwen2")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _, state = nnx.split(model)
    names = hf_names(c)
    tensors = {}
    for key, var in nnx.to_flat_state(state):
        name, transposed = names[key]
        a = np.asarray(jax.device_get(var[...]), np.float32)
        tensors[name] = np.ascontiguousarray(a.T if transposed else a)
    tmp = path / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(hf_config(model, model_type), indent=2))
