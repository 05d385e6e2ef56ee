"""HF ``config.json`` ↔ :class:`ModelConfig`: which architectures map, and our ``qsparse`` key.

:func:`config_from_hf` reads a Llama / Mistral / Qwen2 / BitNet ``config.json``; :func:`hf_config` writes
one for a model (after :func:`check_exportable`: transformers must compute what the model computes).
Every export carries our key ``qsparse``, which transformers keeps as a plain attribute and ignores::

    "qsparse": {"sparsity": {"qkv": 0.4, "out": 0.4, "gate_up": 0.4, "down": 0.4,
                             "block_size": null, "rescale": "none", "grad": "ste"},
                "keep": {"qkv": 38, "out": 38, "gate_up": 38, "down": 57},
                "tokenizer": "tokenizer.json"}

``sparsity`` is the model's top-K (``model.sparsity``: restored on import); ``keep`` the entries each
projection group keeps per token (per block of ``block_size`` when set; null: dense), what
``hf_topk.apply_topk`` applies in transformers; ``tokenizer`` is ``"tokenizer.json"`` (written beside)
or ``"byte"`` (UTF-8 bytes, ids 0-255). Exports written before ``keep`` and ``tokenizer`` existed hold
the sparsity fields directly under ``qsparse`` (BitNet only); they are read too.
"""

from __future__ import annotations

import dataclasses

from ..config import (
    PROJECTION_GROUPS,
    ROPE_TYPES,
    ModelConfig,
    RopeScaling,
    SparsityConfig,
)
from ..errors import ConfigError

SUPPORTED = ("llama", "mistral", "qwen2", "bitnet")
# transformers' BitNet "offline" format: BitLinear layers hold 2-bit packed ternary weights and a scale
BITNET_QUANT = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}
KEY = "qsparse"  # our own config.json key
TOKENIZER_MARKS = ("tokenizer.json", "byte")


class HFError(ConfigError):
    """An HF checkpoint is unsupported, incomplete or malformed (one line naming the problem)."""


def qsparse_section(hf: dict) -> dict:
    """Our ``qsparse`` key of a ``config.json`` dict in the current layout ({} when absent)."""
    q = hf.get(KEY)
    if q is None:
        return {}
    if not isinstance(q, dict):
        raise HFError(f"config.json '{KEY}' must be an object, got {type(q).__name__}")
    if "sparsity" not in q and set(q) & set(PROJECTION_GROUPS):  # the first layout: sparsity fields only
        return {"sparsity": q}
    unknown = set(q) - {"sparsity", "keep", "tokenizer"}
    if unknown:
        raise HFError(f"config.json '{KEY}' has unknown key(s) {sorted(unknown)}; known: sparsity, keep, tokenizer")
    if q.get("tokenizer") not in (None, *TOKENIZER_MARKS):
        raise HFError(f"config.json '{KEY}.tokenizer' must be one of {', '.join(TOKENIZER_MARKS)}, "
                      f"got {q['tokenizer']!r}")
    return q


def keep_counts(c: ModelConfig) -> dict[str, int | None]:
    """Entries each projection group keeps per token (per block), None for a dense group."""
    return {g: c.keep(g) for g in PROJECTION_GROUPS}


def _sparsity(q: dict) -> dict:
    """``ModelConfig`` keyword arguments for our ``qsparse`` section's top-K (none without one)."""
    if "sparsity" not in q:
        return {}
    try:
        return {"sparsity": SparsityConfig(**q["sparsity"])}
    except (TypeError, ConfigError) as e:
        raise HFError(f"config.json '{KEY}.sparsity' is not a valid sparsity config: {e}") from None


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """ModelConfig from an HF ``config.json`` dict (SiLU GLU kept, as for continued training; our
    ``qsparse`` key's top-K restored unless ``overrides`` set ``sparsity``)."""
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
    q = qsparse_section(hf)
    heads = hf["num_attention_heads"]
    window = hf.get("sliding_window") if (mtype == "mistral" or hf.get("use_sliding_window")) else None
    kw = dict(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
              n_kv_heads=hf.get("num_key_value_heads", heads), head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
              hidden_dim=hf["intermediate_size"], activation=act, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
              rope_theta=float(theta), max_seq_len=hf.get("max_position_embeddings", 2048),
              tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=mtype == "qwen2",
              sliding_window=window, rope_scaling=scaling, **bitnet, **_sparsity(q))
    saved = ModelConfig(**kw)
    if "keep" in q and q["keep"] != keep_counts(saved):
        raise HFError(f"config.json '{KEY}.keep' {q['keep']} does not match '{KEY}.sparsity', which keeps "
                      f"{keep_counts(saved)}; correct one of them")
    return saved.replace(**overrides) if overrides else saved


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


def bitnet_family(c: ModelConfig) -> bool:
    """What only transformers' bitnet computes: SubLN, BitLinear input norms, quantization. (A ReLU² GLU alone
    is a Llama / Mistral / Qwen2 with ``hidden_act: relu2``.)"""
    return c.subln or c.input_norm or c.act_bits is not None or c.weight_bits is not None


def check_exportable(c: ModelConfig, mtype: str, ternary: bool):
    """One-line error unless transformers' ``mtype`` computes what this model computes."""
    if c.lte.enabled:
        raise HFError("LTE models (model.lte) cannot be exported: transformers has no expert routers")
    if mtype != "bitnet":
        if bitnet_family(c):
            raise HFError(f"{mtype} holds only SiLU / ReLU² GLU models without SubLN, input norms or quantization; "
                          "export this model as model_type bitnet")
        if ternary:
            raise HFError("ternary export needs a 1.58-bit model (model.weight_bits: '1.58')")
        if c.qkv_bias and mtype != "qwen2":
            raise HFError(f"{mtype} has no q/k/v-only bias: export this model (model.qkv_bias) as model_type qwen2")
        if c.sliding_window and mtype != "mistral":
            raise HFError(f"{mtype} has no sliding window here: export this model (model.sliding_window) as "
                          "model_type mistral")
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


def hf_config(c: ModelConfig, model_type: str | None = None, ternary: bool = False, *,
              tokenizer: str | None = None, special_ids: tuple[int | None, int | None] = (None, None)) -> dict:
    """The ``config.json`` of a model of config ``c`` as transformers' ``model_type`` (default: the one that
    computes it). ``tokenizer``: ``"tokenizer.json"`` or ``"byte"`` (what the export holds; None: unknown);
    ``special_ids``: its (BOS, EOS) token ids."""
    default = "bitnet" if bitnet_family(c) else "qwen2" if c.qkv_bias else "mistral" if c.sliding_window else "llama"
    mtype = model_type or default
    if mtype not in SUPPORTED:
        raise HFError(f"unsupported model_type {mtype!r}; supported: {', '.join(SUPPORTED)}")
    check_exportable(c, mtype, ternary)
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "bitnet": "BitNetForCausalLM"}[mtype]
    out = {"architectures": [arch], "model_type": mtype, "vocab_size": c.vocab_size, "hidden_size": c.dim,
           "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
           "num_key_value_heads": c.kv_heads, "head_dim": c.head_size, "hidden_act": c.activation,
           "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
           "rope_parameters": _rope_parameters(c),
           "tie_word_embeddings": c.tie_embeddings, "torch_dtype": "float32",
           # the tokenizer's own, not the architecture's defaults (Llama 3 ids, outside a small vocabulary)
           "bos_token_id": special_ids[0], "eos_token_id": special_ids[1]}
    if mtype == "mistral":
        out["sliding_window"] = c.sliding_window
    if mtype in ("llama", "bitnet"):
        out["attention_bias"] = False
    if mtype == "llama":
        out["mlp_bias"] = False
    if mtype == "bitnet" and c.weight_bits is not None:
        # packed ternary: BitLinear (y / (s_x·s_w)); dense: AutoBitLinear quantizing online (absmean, Eq. 9-10)
        mode = BITNET_QUANT if ternary else {**BITNET_QUANT, "linear_class": "autobitlinear", "quantization_mode": "online"}
        out["quantization_config"] = {**mode, "use_rms_norm": c.input_norm, "rms_norm_eps": c.norm_eps}
    out[KEY] = {"sparsity": dataclasses.asdict(c.sparsity), "keep": keep_counts(c)}
    if tokenizer is not None:
        if tokenizer not in TOKENIZER_MARKS:
            raise ValueError(f"tokenizer must be one of {TOKENIZER_MARKS} or None, got {tokenizer!r}")
        out[KEY]["tokenizer"] = tokenizer
    return out
