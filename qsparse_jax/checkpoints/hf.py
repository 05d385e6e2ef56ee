"""Hugging Face interop for Llama, Mistral and Qwen2 checkpoints, without torch.

``load_pretrained(path, **overrides)`` reads a local directory (``config.json`` and one or
index-sharded ``*.safetensors``) into a :class:`Transformer`; overrides set any ``ModelConfig`` field
(for Q-Sparse continued training: ``sparsity=SparsityConfig.uniform(0.4)``). With ``mesh`` each
tensor is read slice by slice straight into its shards, so no host ever holds a whole 7B model.
``save_pretrained(model, path)`` writes a directory ``transformers`` loads with
``AutoModelForCausalLM.from_pretrained``. HF stores linear weights [out, in]; we store [in, out].
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import (
    ROPE_TYPES,
    Config,
    DataConfig,
    ModelConfig,
    RopeScaling,
    SparsityConfig,
)
from ..errors import ConfigError
from ..nn.model import Transformer
from ..nn.sharding import state_shardings
from ..ops.quant import ternary_weights
from .native import empty_checkpoints_dir, load_checkpoint_model, write_model_checkpoint


def import_hf(src: str, workdir: str, scan_layers: bool = False) -> Path:
    empty_checkpoints_dir(workdir)  # before the (long) load
    model = load_pretrained(src, scan_layers=scan_layers)
    cfg = Config(model=model.config, data=DataConfig.for_model(model.config))
    return write_model_checkpoint(model, cfg, workdir, tokenizer_from=src)


def export_hf(ckpt_path: str, dst: str, model_type: str | None = None, ternary: bool = False) -> Path:
    cfg, params, graphdef = load_checkpoint_model(ckpt_path)
    save_pretrained(nnx.merge(graphdef, params), dst, model_type=model_type, ternary=ternary)
    if cfg.model.sparsity.enabled:
        print("note: transformers runs the exported weights with dense activations (top-K is not part of its "
              "models); qsparse_jax.hf.load_pretrained restores the top-K sparsity", file=sys.stderr)
    return Path(dst)


SUPPORTED = ("llama", "mistral", "qwen2", "bitnet")
# transformers' BitNet "offline" format: BitLinear layers hold 2-bit packed ternary weights and a scale
BITNET_QUANT = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}
_PACK = 4  # ternary values per stored byte


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
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "relu2"):  # transformers' ACT2FN["relu2"] is ReLU², ours (Q-Sparse Eq. 11)
        raise HFError(f"unsupported hidden_act {act!r} for {mtype}; supported: silu, relu2")
    bitnet = {}
    if mtype == "bitnet":  # BitNet b1.58: SubLN, int8 activations, ternary weights (Q-Sparse Eq. 4-10)
        qc = hf.get("quantization_config") or {}
        if hf.get("attention_bias"):
            raise HFError("bitnet checkpoints with attention_bias are not supported")
        mode = (qc.get("linear_class", "bitlinear"), qc.get("quantization_mode", "offline"))
        if qc and mode not in (("bitlinear", "offline"), ("autobitlinear", "online")):
            raise HFError(f"bitnet linear_class/quantization_mode {'/'.join(mode)} is not supported; "
                          "supported: bitlinear/offline, autobitlinear/online")
        bitnet = dict(subln=True, input_norm=bool(qc.get("use_rms_norm", False)))
        if qc:
            bitnet.update(act_bits=8, weight_bits="1.58")
        if "qsparse" in hf:  # our own key: the top-K sparsity the exported model was trained with
            try:
                bitnet["sparsity"] = SparsityConfig(**hf["qsparse"])
            except (TypeError, ConfigError) as e:
                raise HFError(f"config.json 'qsparse' is not a valid sparsity config: {e}") from None
    heads = hf["num_attention_heads"]
    window = hf.get("sliding_window") if (mtype == "mistral" or hf.get("use_sliding_window")) else None
    kw = dict(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
              n_kv_heads=hf.get("num_key_value_heads", heads), head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
              hidden_dim=hf["intermediate_size"], activation=act, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
              rope_theta=float(theta), max_seq_len=hf.get("max_position_embeddings", 2048),
              tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=mtype == "qwen2",
              sliding_window=window, rope_scaling=scaling, **bitnet)
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
        if cfg.subln:
            names[("layers", i, "attn", "subln", "weight")] = (p + "self_attn.attn_sub_norm.weight", False)
            names[("layers", i, "mlp", "subln", "weight")] = (p + "mlp.ffn_sub_norm.weight", False)
    return names


def pack_bitnet(levels: np.ndarray) -> np.ndarray:
    """[out, in] ternary levels → [out/4, in] uint8, transformers' BitNet layout: stored row r holds
    output rows r, r + out/4, r + out/2, r + 3·out/4 as (level + 1) in bits 0-1, 2-3, 4-5, 6-7."""
    q = (levels.astype(np.int16) + 1).astype(np.uint8).reshape(_PACK, -1, levels.shape[1])
    return np.bitwise_or.reduce([q[i] << np.uint8(2 * i) for i in range(_PACK)]).astype(np.uint8)


def unpack_bitnet(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_bitnet`: [out/4, in] uint8 → [out, in] int8 levels in {−1, 0, 1}."""
    return np.concatenate([((packed >> np.uint8(2 * i)) & 3).astype(np.int8) - 1 for i in range(_PACK)])


def _bitnet_weight(tensors: "_Tensors", name: str) -> np.ndarray:
    """A BitLinear weight as the float [out, in] that our absmean ternary quantizer maps back to exactly
    ``levels / s``: ``levels · (n / nnz) / s`` has mean |w| = 1/s, and rounding keeps each level."""
    levels = unpack_bitnet(tensors.read(name)).astype(np.float32)
    scale = tensors.read(name.removesuffix("weight") + "weight_scale").astype(np.float32).reshape(-1)[0]
    nnz = max(np.count_nonzero(levels), 1)
    return levels * np.float32(levels.size / nnz) / scale


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

    def dtype(self, name: str) -> str:
        return self.handle(name).get_slice(name).get_dtype()

    def read(self, name: str, index=None) -> np.ndarray:
        sl = self.handle(name).get_slice(name)
        return np.asarray(sl[index] if index is not None else sl[:])


def _tensor_reader(tensors: "_Tensors", names: dict, key: tuple, shape: tuple, pdt):
    """``read(index)``: our parameter ``key`` (of ``shape``) from its HF tensor, all of it or one shard's
    slice, after checking the stored shape."""
    if key not in names:
        raise HFError(f"no HF tensor maps to parameter {'/'.join(map(str, key))}")
    name, transposed = names[key]
    stored = tensors.shape(name)
    packed = transposed and tensors.dtype(name) == "U8"  # a BitLinear's 2-bit ternary weight
    if packed:
        stored = (stored[0] * _PACK, *stored[1:])
    want = tuple(reversed(shape)) if transposed else tuple(shape)
    if stored != want:
        raise HFError(f"tensor {name!r} has shape {list(stored)}, expected {list(want)} for this config")
    unpacked = []

    def read(index):
        if packed:  # packing interleaves output rows, so unpack whole (once), then slice
            if not unpacked:
                unpacked.append(_bitnet_weight(tensors, name))
            a = unpacked[0] if index is None else unpacked[0][tuple(reversed(index))]
        elif index is None:
            a = tensors.read(name)
        else:  # read only this shard's slice
            a = tensors.read(name, tuple(reversed(index)) if transposed else tuple(index))
        return (a.T if transposed else a).astype(pdt)

    return read


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
        shardings = dict(nnx.to_flat_state(state_shardings(abstract, mesh)))
    flat = dict(nnx.to_flat_state(abstract))
    names = hf_names(cfg)
    pdt = jnp.dtype(cfg.param_dtype)
    for key, var in flat.items():
        if cfg.scan_layers and key[0] == "layers":  # stacked: one HF tensor per layer along axis 0
            readers = [_tensor_reader(tensors, names, ("layers", i, *key[1:]), var.shape[1:], pdt)
                       for i in range(cfg.n_layers)]

            def read(index, readers=readers):
                if index is None:
                    return np.stack([r(None) for r in readers])
                return np.stack([r(index[1:]) for r in readers[index[0]]])
        else:
            read = _tensor_reader(tensors, names, key, var.shape, pdt)
        if shardings is None:
            value = jnp.asarray(read(None))
        else:
            sh = shardings[key].get_value() if isinstance(shardings[key], nnx.Variable) else shardings[key]
            value = jax.make_array_from_callback(var.shape, sh, read)
        var.set_value(value)
    for name in tensors.files:  # BitLinear input norms: ours are parameter-free
        if name.endswith(".rms_norm.weight") and not np.all(tensors.read(name) == 1):
            raise HFError(f"tensor {name!r}: learned BitLinear input-norm weights are not supported (must be ones)")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _bitnet_family(c: ModelConfig) -> bool:
    """What only transformers' bitnet computes: SubLN, BitLinear input norms, quantization. (A ReLU² GLU alone
    is a Llama / Mistral / Qwen2 with ``hidden_act: relu2``.)"""
    return c.subln or c.input_norm or c.act_bits is not None or c.weight_bits is not None


def _check_exportable(c: ModelConfig, mtype: str, ternary: bool):
    """One-line error unless transformers' ``mtype`` computes what this model computes."""
    if mtype != "bitnet":
        if _bitnet_family(c):
            raise HFError(f"{mtype} holds only SiLU / ReLU² GLU models without SubLN, input norms or quantization; "
                          "export this model as model_type bitnet")
        if ternary:
            raise HFError("ternary export needs a 1.58-bit model (model.weight_bits: '1.58')")
        return
    if not (c.subln or c.input_norm):
        raise HFError("transformers' bitnet always applies SubLN: export needs model.subln or model.input_norm "
                      "(a ReLU² model without them exports as llama)")
    if c.qkv_bias or c.sliding_window:
        raise HFError("transformers' bitnet has no q/k/v-only bias and no sliding window")
    quantized = (c.weight_bits, c.act_bits)
    if quantized not in (("1.58", 8), (None, None)) or (quantized == (None, None) and c.input_norm):
        raise HFError(f"bitnet export needs weight_bits '1.58' with act_bits 8, or neither (and no input_norm); "
                      f"got weight_bits {c.weight_bits!r}, act_bits {c.act_bits!r}")
    if ternary and c.weight_bits != "1.58":
        raise HFError("ternary export needs a 1.58-bit model (model.weight_bits: '1.58')")


def hf_config(model: Transformer, model_type: str | None = None, ternary: bool = False) -> dict:
    c = model.config
    default = "bitnet" if _bitnet_family(c) else "qwen2" if c.qkv_bias else "mistral" if c.sliding_window else "llama"
    mtype = model_type or default
    if mtype not in SUPPORTED:
        raise HFError(f"unsupported model_type {mtype!r}; supported: {', '.join(SUPPORTED)}")
    _check_exportable(c, mtype, ternary)
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "bitnet": "BitNetForCausalLM"}[mtype]
    out = {"architectures": [arch], "model_type": mtype, "vocab_size": c.vocab_size, "hidden_size": c.dim,
           "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
           "num_key_value_heads": c.kv_heads, "head_dim": c.head_size, "hidden_act": c.activation,
           "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
           "rope_parameters": _rope_parameters(c),
           "tie_word_embeddings": c.tie_embeddings, "torch_dtype": "float32"}
    if mtype == "mistral":
        out["sliding_window"] = c.sliding_window
    if mtype in ("llama", "bitnet"):
        out["attention_bias"] = False
    if mtype == "bitnet":  # its defaults name Llama 3 token ids, outside a small vocabulary
        out.update(bos_token_id=None, eos_token_id=None)
    if mtype == "llama":
        out["mlp_bias"] = False
    if mtype == "bitnet" and c.weight_bits is not None:
        # packed ternary: BitLinear (y / (s_x·s_w)); dense: AutoBitLinear quantizing online (absmean, Eq. 9-10)
        mode = BITNET_QUANT if ternary else {**BITNET_QUANT, "linear_class": "autobitlinear", "quantization_mode": "online"}
        out["quantization_config"] = {**mode, "use_rms_norm": c.input_norm, "rms_norm_eps": c.norm_eps}
    if mtype == "bitnet" and c.sparsity.enabled:  # transformers ignores it; our importer restores top-K
        out["qsparse"] = dataclasses.asdict(c.sparsity)
    return out


def _per_layer(c: ModelConfig, flat):
    """(our per-layer key, float32 numpy array) of every parameter, unstacking ``scan_layers`` ones."""
    for key, var in flat:
        a = np.asarray(jax.device_get(var[...]), np.float32)
        if c.scan_layers and key[0] == "layers":
            for i in range(c.n_layers):
                yield ("layers", i, *key[1:]), a[i]
        else:
            yield key, a


_MASK, _SLORB_S, _SLORB_X = "mask", "slorb_s", "slorb_x"  # AST state of a SparseLinear (layers.py)


def _fold_weight_sparsity(c: ModelConfig, params: dict) -> dict:
    """AST models: each masked weight as the matrix the model multiplies by, ``W ⊙ M`` (N:M zeros in place),
    plus SLoRB folded in exactly, ``W ⊙ M + Xᵀ S`` (input ``j`` of group ``g`` adds ``X_g,j%k · S_g`` to its
    row; this fills the pruned positions, so the exported weights are then dense). The mask and SLoRB
    entries themselves are dropped: transformers has no place for them."""
    out = {}
    for key, a in params.items():
        if key[-1] in (_MASK, _SLORB_S, _SLORB_X):
            continue
        base = key[:-1]
        if key[-1] == "weight" and base + (_MASK,) in params:
            a = np.where(params[base + (_MASK,)] != 0, a, np.float32(0))
            if base + (_SLORB_S,) in params:
                if c.weight_bits is not None:
                    raise HFError("SLoRB cannot be folded exactly into quantized weights (it runs in full precision "
                                  "after the quantized matmul); export a model trained without model.weight_sparsity.slorb")
                S = params[base + (_SLORB_S,)]  # [in/k, out]
                k = a.shape[0] // S.shape[0]
                X = params.get(base + (_SLORB_X,), np.ones((S.shape[0], k), np.float32))  # [in/k, k]
                a = a + (X[:, :, None] * S[:, None, :]).reshape(a.shape)
        out[key] = a
    return out


def save_pretrained(model: Transformer, path: str | Path, *, model_type: str | None = None, ternary: bool = False):
    """Write ``config.json`` + ``model.safetensors`` loadable by transformers.

    Llama / Mistral / Qwen2: float32 dense weights; a ReLU² GLU (no SubLN, input norms or quantization)
    exports as these with ``hidden_act: relu2`` (transformers' ``ACT2FN["relu2"]`` is ReLU²). BitNet-style
    models (SubLN, 1.58-bit) go to transformers' ``bitnet``: float weights it quantizes online, or with
    ``ternary=True`` 2-bit packed ternary values + per-tensor scale (``w = levels / s``, Eq. 9-10), 16x
    smaller. Top-K is not part of transformers' models: they run the exported weights with dense
    activations. AST (N:M weight sparsity) models are written as ``W ⊙ M``, the zeros in place; SLoRB is
    folded in exactly, which makes those weights dense (:func:`_fold_weight_sparsity`).
    """
    from safetensors.numpy import save_file

    c = model.config
    config = hf_config(model, model_type, ternary)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _, state = nnx.split(model)
    names = hf_names(c)
    tensors = {}
    params = _fold_weight_sparsity(c, dict(_per_layer(c, nnx.to_flat_state(state))))
    for key, a in params.items():
        name, transposed = names[key]
        if ternary and transposed and name != "lm_head.weight":  # the LM head stays full precision
            if a.shape[1] % _PACK:
                raise HFError(f"ternary export packs {_PACK} output rows per byte: {name!r} has {a.shape[1]} outputs")
            levels, s = ternary_weights(jnp.asarray(a))
            tensors[name] = pack_bitnet(np.asarray(levels).T)
            tensors[name.removesuffix("weight") + "weight_scale"] = np.asarray(s, np.float32).reshape(1)
        else:
            tensors[name] = np.ascontiguousarray(a.T if transposed else a)
    if config["model_type"] == "bitnet" and not c.subln:  # ones: RMSNorm before the input norm is a no-op
        for i in range(c.n_layers):
            p = f"model.layers.{i}."
            tensors[p + "self_attn.attn_sub_norm.weight"] = np.ones(c.n_heads * c.head_size, np.float32)
            tensors[p + "mlp.ffn_sub_norm.weight"] = np.ones(c.hidden_dim, np.float32)
    if config.get("quantization_config", {}).get("use_rms_norm"):  # parameter-free BitLinear input norms
        for name in list(tensors):
            if name.endswith(("_proj.weight")) and "lm_head" not in name:
                tensors[name.removesuffix("weight") + "rms_norm.weight"] = np.ones(
                    tensors[name].shape[1], np.float32)
    tmp = path / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config, indent=2))

