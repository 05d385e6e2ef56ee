"""Dense → LTE: neurons grouped and permuted into experts, routers added (or fit, MoEfication), written as a checkpoint.

``qsparse lte convert (--ckpt DIR | --hf DIR) WORKDIR`` is the command; the result trains with
``--init_from WORKDIR/checkpoints``. The choices behind it are in ``nn/lte.py``'s docstring.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..checkpoints.native import empty_checkpoints_dir, write_model_checkpoint
from ..checkpoints.source import load_model
from ..config import LTEConfig
from ..errors import ConfigError
from ..nn.lte import _blocks, _copy_into, walk
from ..nn.model import Transformer
from ..ops.experts import fit_router, group_experts, moefication_labels
from ..progress import track
from .calibration import calibration_batches

_HIDDEN_OUT = (("w_gate", "weight"), ("w_up", "weight"), ("w_gate", "mask"), ("w_up", "mask"), ("subln", "weight"))


def permute_ffn(ffn: dict, perm) -> dict:
    """One FFN's pure-dict parameters with its hidden neurons reordered by ``perm``: gate/up columns
    (and AST masks), down rows, the SubLN weight. The FFN computes the same function (a sum over neurons
    in another order); top-K at the down input is per-token magnitude top-K, also order-free."""
    out = jax.tree.map(lambda a: a, ffn)
    perm = np.asarray(perm)
    for mod, leaf in _HIDDEN_OUT:
        if mod in out and leaf in out[mod]:
            out[mod][leaf] = jnp.take(out[mod][leaf], perm, axis=-1)
    for leaf in ("weight", "mask"):
        if leaf in out.get("w_down", {}):
            out["w_down"][leaf] = jnp.take(out["w_down"][leaf], perm, axis=-2)
    if any("slorb_s" in out.get(m, {}) for m in ("w_gate", "w_up", "w_down")):
        raise ConfigError("LTE: cannot regroup neurons of a model with SLoRB (its groups follow the neuron order)")
    return out


def permute_model_params(pure: dict, perms, scan_layers: bool) -> dict:
    """A model's pure-dict parameters (``nnx.to_pure_dict``) with layer ``l``'s FFN permuted by ``perms[l]``."""
    out = dict(pure)
    if scan_layers:
        layers = dict(pure["layers"])
        n = len(perms)
        per = [permute_ffn(jax.tree.map(lambda a: a[l], layers["mlp"]), perms[l]) for l in range(n)]
        layers["mlp"] = jax.tree.map(lambda *a: jnp.stack(a), *per)
        out["layers"] = layers
    else:
        out["layers"] = {i: {**layer, "mlp": permute_ffn(layer["mlp"], perms[i])} for i, layer in pure["layers"].items()}
    return out


def layer_ffn_params(pure: dict, scan_layers: bool, n_layers: int) -> list[dict]:
    if scan_layers:
        return [jax.tree.map(lambda a: a[l], pure["layers"]["mlp"]) for l in range(n_layers)]
    return [pure["layers"][i]["mlp"] for i in range(n_layers)]


def fit_moefication_routers(model, batches, *, top_k: int | None = None, steps: int = 300, lr: float = 1e-2,
                            progress: bool = False):
    """Fit every layer's router to a dense model's expert activity (choice 9) on ``batches`` (a list of
    token arrays [b, s]); returns ``(model, accuracies)`` — the model in place with routers set, and per
    layer the fraction of the fitted top-k that matches the label top-k on the calibration tokens.
    ``progress``: report the layers as they are fit (``qsparse_jax/progress.py``)."""
    cfg = model.config
    k = top_k or cfg.lte.top_k
    if k is None:
        raise ConfigError("MoEfication needs top_k (experts kept per token)")
    per_layer_x, per_layer_h = [[] for _ in range(cfg.n_layers)], [[] for _ in range(cfg.n_layers)]
    for tokens in track(batches, "lte convert: calibration", unit="batches", enabled=progress):
        for l, (block, (xin, _)) in enumerate(zip(_blocks(model), walk(model, jnp.asarray(tokens), dense=True))):
            per_layer_x[l].append(xin.reshape(-1, cfg.dim))
            per_layer_h[l].append(block.mlp.expert_hidden(xin).reshape(-1, cfg.hidden_dim))
    routers, acc = [], []
    for l, block in track(list(enumerate(_blocks(model))), "lte convert: fitting routers", unit="layers",
                          enabled=progress):
        x = jnp.concatenate(per_layer_x[l])
        y = moefication_labels(jnp.concatenate(per_layer_h[l]), cfg.lte.expert_size, k)
        w = fit_router(x, y, jnp.zeros_like(block.mlp.router[...], jnp.float32), steps=steps, lr=lr)
        pred = jnp.sum(jax.nn.one_hot(jax.lax.top_k(x @ w, k)[1], y.shape[1], dtype=jnp.float32), axis=-2)
        acc.append(float(jnp.sum(pred * y) / jnp.sum(y)))
        routers.append(w.astype(block.mlp.router[...].dtype))
    if cfg.scan_layers:
        model.layers.mlp.router[...] = jnp.stack(routers)
    else:
        for block, w in zip(model.layers, routers):
            block.mlp.router[...] = w
    return model, acc


def to_lte(model, lte: LTEConfig, *, seed: int = 0, iters: int = 25, progress: bool = False):
    """A dense ``Transformer`` → the LTE model of the same weights: each layer's neurons grouped
    (:func:`group_experts`), permuted contiguous, routers added (random, choice 5). Returns
    ``(lte_model, perms)``; ``progress``: report the layers as they are grouped."""

    cfg = model.config
    if not lte.enabled:
        lte = LTEConfig(**{**lte.__dict__, "enabled": True})
    if cfg.sparsity.block_size is not None and cfg.sparsity.down > 0:
        raise ConfigError("LTE: block top-K at the down input depends on the neuron order; regrouping would change "
                          "the model (set sparsity.down 0 or block_size null)")
    new_cfg = cfg.replace(lte=lte)
    pure = nnx.to_pure_dict(nnx.state(model))
    ffns = layer_ffn_params(pure, cfg.scan_layers, cfg.n_layers)
    perms = [group_experts(f["w_gate"]["weight"], lte.expert_size, seed=seed + l, iters=iters)
             for l, f in track(list(enumerate(ffns)), "lte convert: grouping experts", unit="layers",
                               enabled=progress)]
    pure = permute_model_params(pure, perms, cfg.scan_layers)
    fresh = Transformer(new_cfg, rngs=nnx.Rngs(seed))  # routers from here; everything else overwritten
    graphdef, state = nnx.split(fresh)
    target = nnx.to_pure_dict(state)
    _copy_into(target, pure)
    nnx.replace_by_pure_dict(state, target)
    return nnx.merge(graphdef, state), perms


def write_checkpoint(model, cfg, workdir: str | Path) -> Path:
    """``WORKDIR/checkpoints/0`` (parameters) + ``WORKDIR/config.yaml``, for ``train.py --init_from``."""

    return write_model_checkpoint(model, cfg, workdir)


def convert(workdir: str, *, ckpt: str | None = None, hf: str | None = None, lte: LTEConfig | None = None,
            seed: int = 0, calib_batches: int = 8, fit_steps: int = 300, progress: bool = True) -> dict:
    """Dense checkpoint / HF model → grouped LTE checkpoint in ``workdir`` (MoEfication: routers fit on
    ``calib_batches`` training batches). Returns a summary. ``progress``: per-layer progress on stderr."""
    import dataclasses

    empty_checkpoints_dir(workdir)  # refused before the (long) conversion, not after it
    model, cfg = load_model(hf, ckpt)
    lte = lte or LTEConfig(enabled=True)
    if cfg.model.lte.enabled:
        raise ConfigError("the source model already has LTE routers; convert a dense model")
    lte_model, _ = to_lte(model, lte, seed=seed, progress=progress)
    summary = {"experts": lte_model.config.hidden_dim // lte.expert_size, "expert_size": lte.expert_size}
    if lte.mode == "moefication":
        batches = calibration_batches(cfg.data, calib_batches)
        lte_model, acc = fit_moefication_routers(lte_model, batches, steps=fit_steps, progress=progress)
        summary["router_topk_recall"] = acc
    new = dataclasses.replace(cfg, model=lte_model.config)
    write_checkpoint(lte_model, new, workdir)
    return summary

