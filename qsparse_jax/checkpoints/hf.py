"""Hugging Face interop for Llama, Mistral, Qwen2 and BitNet checkpoints, without torch: weights in, weights out.

``load_pretrained(path, **overrides)`` reads a local directory (``config.json`` and one or
index-sharded ``*.safetensors``) into a :class:`Transformer`; overrides set any ``ModelConfig`` field
(for Q-Sparse continued training: ``sparsity=SparsityConfig.uniform(0.4)``). With ``mesh`` each
tensor is read slice by slice straight into its shards, so no host ever holds a whole 7B model.
``save_pretrained(model, path, tokenizer=...)`` writes a directory ``transformers`` loads with
``AutoModelForCausalLM.from_pretrained`` (and ``AutoTokenizer``), atomically. HF stores linear weights
[out, in]; we store [in, out]. ``import_hf`` / ``export_hf`` convert between such a directory and our
checkpoints (``qsparse import-hf`` / ``export-hf``), the tokenizer and the top-K sparsity included
(``config.json`` key ``qsparse``: :mod:`.hf_config`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import Config, DataConfig, ModelConfig
from ..nn.model import Transformer
from ..nn.sharding import state_shardings
from ..ops.quant import ternary_weights
from .hf_config import BITNET_QUANT, SUPPORTED, HFError, config_from_hf, hf_config  # noqa: F401 (re-exported)
from .hf_files import (
    Progress,
    atomic_dir,
    check_target,
    copy_tokenizer,
    copy_tokenizer_side_files,
    hf_tokenizer,
)
from .native import (
    empty_checkpoints_dir,
    load_checkpoint_model,
    read_config,
    write_model_checkpoint,
)

_PACK = 4  # ternary values per stored byte
TOPK_NOTE = ("note: config.json key 'qsparse' holds the top-K sparsity: load_pretrained, import-hf and eval / generate "
             "--hf restore it; transformers runs the weights dense unless qsparse_jax.checkpoints.hf_topk.apply_topk("
             "model) adds it")


def read_hf_config(path: str | Path, **overrides) -> tuple[dict, ModelConfig]:
    """(``config.json`` as a dict, the :class:`ModelConfig` it describes with ``overrides``) of an HF directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise HFError(f"no config.json in {path}")
    try:
        hf = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise HFError(f"{path / 'config.json'}: not valid JSON ({e.msg})") from None
    try:
        return hf, config_from_hf(hf, **overrides)
    except KeyError as e:
        raise HFError(f"config.json in {path} lacks {e.args[0]!r}") from None


def import_hf(src: str, workdir: str, scan_layers: bool = False) -> Path:
    """An HF directory as ``WORKDIR/checkpoints/0`` + ``WORKDIR/config.yaml``, with its tokenizer files
    (``data.tokenizer``: the copied ``tokenizer.json``, or bytes; see :func:`.hf_files.hf_tokenizer`)."""
    empty_checkpoints_dir(workdir)  # before the (long) load
    path = Path(src)
    hf, c = read_hf_config(path)
    tokenizer = hf_tokenizer(path, hf, c.vocab_size)
    model = load_pretrained(path, scan_layers=scan_layers)
    if tokenizer != "byte":  # tokenizer.json itself is copied by write_model_checkpoint
        copy_tokenizer_side_files(path, Path(workdir))
    cfg = Config(model=model.config, data=DataConfig.for_model(model.config))
    return write_model_checkpoint(model, cfg, workdir, tokenizer_from=None if tokenizer == "byte" else src)


def export_hf(ckpt_path: str, dst: str, model_type: str | None = None, ternary: bool = False,
              overwrite: bool = False) -> Path:
    """A checkpoint (its latest step, or one step directory) as an HF directory ``dst``, written atomically
    with its tokenizer; a non-empty ``dst`` is refused unless ``overwrite`` (replaced whole)."""
    dst = Path(dst)
    check_target(dst, overwrite, protect=Path(ckpt_path))  # before the (long) load
    tokenizer = read_config(ckpt_path)[0].get("data", {}).get("tokenizer", "byte")
    if tokenizer != "byte" and not Path(tokenizer).is_file():
        raise HFError(f"the checkpoint's tokenizer {tokenizer} (data.tokenizer) does not exist any more; the export "
                      "must carry it: put it back and export again")
    cfg, params, graphdef = load_checkpoint_model(ckpt_path)
    save_pretrained(nnx.merge(graphdef, params), dst, model_type=model_type, ternary=ternary,
                    tokenizer=cfg.data.tokenizer, overwrite=overwrite)
    if cfg.model.sparsity.enabled:
        print(TOPK_NOTE, file=sys.stderr)
    if cfg.data.tokenizer == "byte":
        print("note: the model reads UTF-8 bytes (ids 0-255): the export has no tokenizer.json, and its config.json "
              "says 'qsparse': {'tokenizer': 'byte'}", file=sys.stderr)
    return dst


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
    """A Transformer with an HF Llama / Mistral / Qwen2 / BitNet checkpoint's weights (see module docstring)."""
    path = Path(path)
    _, cfg = read_hf_config(path, **overrides)
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
    progress = Progress(len(flat), f"reading {path}")
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
        progress.update()
    progress.close()
    for name in tensors.files:  # BitLinear input norms: ours are parameter-free
        if name.endswith(".rms_norm.weight") and not np.all(tensors.read(name) == 1):
            raise HFError(f"tensor {name!r}: learned BitLinear input-norm weights are not supported (must be ones)")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


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
    plus SLoRB folded in exactly, ``W ⊙ M + Xᵀ S`` (``X`` ``[in/k, in]``, the group sums when not trained;
    this fills the pruned positions, so the exported weights are then dense). The mask and SLoRB
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
                X = params.get(base + (_SLORB_X,))  # [in/k, in]; absent: the fixed group sums
                a = a + (np.repeat(S, k, axis=0) if X is None else X.T @ S)
        out[key] = a
    return out


def save_pretrained(model: Transformer, path: str | Path, *, model_type: str | None = None, ternary: bool = False,
                    tokenizer: str | None = None, overwrite: bool = False) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ the tokenizer) loadable by transformers.

    Llama / Mistral / Qwen2: float32 dense weights; a ReLU² GLU (no SubLN, input norms or quantization)
    exports as these with ``hidden_act: relu2`` (transformers' ``ACT2FN["relu2"]`` is ReLU²). BitNet-style
    models (SubLN, 1.58-bit) go to transformers' ``bitnet``: float weights it quantizes online, or with
    ``ternary=True`` 2-bit packed ternary values + per-tensor scale (``w = levels / s``, Eq. 9-10), 16x
    smaller. Top-K is not part of transformers' models: config.json's ``qsparse`` key holds it, which
    :func:`load_pretrained` restores and ``hf_topk.apply_topk`` applies in transformers. AST (N:M weight
    sparsity) models are written as ``W ⊙ M``, the zeros in place; SLoRB is folded in exactly, which makes
    those weights dense (:func:`_fold_weight_sparsity`).

    ``tokenizer``: ``"byte"`` or the model's ``tokenizer.json``, written with the files AutoTokenizer reads
    (None: none, and config.json does not say which). The directory is built beside ``path`` and renamed
    into place; a ``path`` holding anything is refused unless ``overwrite`` (replaced whole).
    """
    from safetensors.numpy import save_file

    c = model.config
    hf_config(c, model_type, ternary)  # one-line errors before anything is written
    path = Path(path)
    with atomic_dir(path, overwrite) as out:
        special = (None, None)
        if tokenizer is not None and tokenizer != "byte":
            special = copy_tokenizer(tokenizer, out, c.max_seq_len)
        mark = None if tokenizer is None else "byte" if tokenizer == "byte" else "tokenizer.json"
        config = hf_config(c, model_type, ternary, tokenizer=mark, special_ids=special)
        tensors = _hf_tensors(model, config, ternary, Progress(len(hf_names(c)), f"writing {path}"))
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return path


def _hf_tensors(model: Transformer, config: dict, ternary: bool, progress: Progress) -> dict[str, np.ndarray]:
    """The safetensors of ``model`` as ``config`` (its config.json) lays them out."""
    c = model.config
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
        progress.update()
    progress.close()
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
    progress.note(f"saving {sum(t.nbytes for t in tensors.values()) / 2**30:.1f} GiB")
    return tensors
