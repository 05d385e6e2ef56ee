"""Calibration on a model and one-shot N:M pruning of every block linear (magnitude, Wanda, SparseGPT).

Blocks are calibrated and pruned one after another, each on the outputs of the already pruned ones
(sequential calibration, as SparseGPT does); the scores and masks are ``ops/nm.py``'s and
``ops/sparsegpt.py``'s.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ..data.pipeline import load_splits, train_dataset
from ..nn.layers import SparseLinear, _dtype
from ..nn.model import with_config
from ..ops.nm import _JIT_CACHE, magnitude_score, nm_mask, wanda_score
from ..ops.sparsegpt import sparsegpt_prune
from ..progress import track
from ..train.step import split_batch

METHODS = ("magnitude", "wanda", "sparsegpt")


def block_linears(block) -> list[tuple[tuple, object]]:
    """``(path inside the block, SparseLinear)`` of every linear of a Block (q, k, v, o, gate, up, down)."""
    from flax import nnx

    return [(tuple(p), mod) for p, mod in nnx.iter_modules(block) if isinstance(mod, SparseLinear)]


@contextlib.contextmanager
def _record_inputs(record: Callable):
    """Within the block: every ``SparseLinear.project(xs)`` call also calls ``record(linear, xs)``.

    ``xs`` is the tensor the matmul consumes (after the input norm, top-K and int8 fake-quant, with
    ``kernels`` off), so projections sharing an input (q/k/v, gate/up) see the same tensor. Implemented by
    temporarily replacing the class method while a (traced) forward runs: the model code stays untouched."""

    original = SparseLinear.project

    def project(self, xs):
        record(self, xs)
        return original(self, xs)

    SparseLinear.project = project
    try:
        yield
    finally:
        SparseLinear.project = original


def _cached(kind: str, graphdef, make):
    """One compiled function per (kind, block structure): the layers of a model share it."""
    key = (kind, graphdef)
    if key not in _JIT_CACHE:
        if len(_JIT_CACHE) > 16:
            _JIT_CACHE.clear()
        _JIT_CACHE[key] = make()
    return _JIT_CACHE[key]


def _block_stats_fn(graphdef, hessian: bool):
    return _cached(f"stats{hessian}", graphdef, lambda: _make_block_stats_fn(graphdef, hessian))


def _make_block_stats_fn(graphdef, hessian: bool):
    """jitted ``(block_state, x) -> {path: (Σ x_j², XᵀX or None, tokens)}`` for one Block's linears."""
    from flax import nnx

    def fn(state, x):
        block = nnx.merge(graphdef, state)
        names = {id(mod): path for path, mod in block_linears(block)}
        seen: dict[int, tuple] = {}  # id(xs) -> stats: shared inputs are reduced once
        out = {}

        def record(lin, xs):
            key = id(xs)
            if key not in seen:
                x2 = xs.reshape(-1, xs.shape[-1]).astype(jnp.float32)
                seen[key] = (jnp.sum(x2 * x2, axis=0), x2.T @ x2 if hessian else None)
            out[names[id(lin)]] = seen[key]

        with _record_inputs(record):
            block(x, None, None, None)
        return out

    return jax.jit(fn)


def _block_forward_fn(graphdef):
    from flax import nnx

    return _cached("forward", graphdef, lambda: jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, None, None, None)))


def _embed(model, tokens):
    return jnp.take(model.embed[...], jnp.asarray(tokens), axis=0).astype(_dtype(model.config.dtype))


def _block_state(model, i: int):
    """(graphdef, state) of block ``i``, from a list of blocks or the layer-stacked one (``scan_layers``)."""
    from flax import nnx

    if model.config.scan_layers:
        graphdef, state = nnx.split(model.layers)
        return graphdef, jax.tree.map(lambda a: a[i], state)
    return nnx.split(model.layers[i])


def _set_weight(model, i: int, path: tuple, w):
    layers = model.layers if model.config.scan_layers else model.layers[i]
    mod = layers
    for p in path:
        mod = mod[p] if isinstance(p, int) else getattr(mod, p)
    var = mod.weight
    old = var[...]
    new = jnp.asarray(w, old.dtype)
    if model.config.scan_layers:
        new = old.at[i].set(new)
    var.set_value(jax.device_put(new, old.sharding) if hasattr(old, "sharding") else new)


def calibrate(model, batches: Iterable, *, hessian: bool = True) -> list[dict]:
    """Per block and per linear the calibration statistics of the **dense** model: a list (one per layer)
    of ``{path: {"act_norm": ‖x_j‖₂ [in], "H": XᵀX [in, in] (float64) or None, "tokens": count}}``.

    ``batches``: int token arrays ``[B, S]``. The blocks run one by one on the cached residual stream, so
    each layer is run once per batch. (For the sequential variant, where layer ``i`` sees the outputs of
    the already pruned layers, use :func:`prune_model`.)"""
    xs = [_embed(model, b) for b in batches]
    out = []
    for i in range(model.config.n_layers):
        graphdef, state = _block_state(model, i)
        stats, forward = _block_stats_fn(graphdef, hessian), _block_forward_fn(graphdef)
        out.append(_reduce(stats, state, xs))
        xs = [forward(state, x) for x in xs]
    return out


def _reduce(stats_fn, state, xs) -> dict:
    acc: dict = {}
    for x in xs:
        for path, (sq, h) in stats_fn(state, x).items():
            a = acc.setdefault(path, {"sq": 0.0, "H": None if h is None else 0.0, "tokens": 0})
            a["sq"] = a["sq"] + np.asarray(sq, np.float64)
            if h is not None:
                a["H"] = a["H"] + np.asarray(h, np.float64)
            a["tokens"] += int(np.prod(x.shape[:-1]))
    return {p: {"act_norm": np.sqrt(a["sq"]), "H": a["H"], "tokens": a["tokens"]} for p, a in acc.items()}


def prune_model(model, method: str, batches: Iterable | None = None, *, n: int = 2, m: int = 4,
                blocksize: int = 128, percdamp: float = 0.01, progress: bool = False):
    """One-shot N:M pruning of every block linear (q, k, v, o, gate, up, down; not the embedding or LM
    head): returns ``(pruned model, report)``, the report one ``{"layer", "path", "kept", "rel_err"}`` per
    linear. The input model is pruned too (the returned one shares its Variables; clone it first to keep it).

    ``magnitude`` needs no data. ``wanda`` and ``sparsegpt`` calibrate on ``batches`` (int tokens
    ``[B, S]``) **sequentially**, as both papers' code does: the blocks run one at a time on the cached
    residual stream, and block ``i``'s statistics come from the outputs of the already pruned blocks
    ``< i`` (inside one block every linear is calibrated from that block's dense forward, also as they do).
    ``rel_err``: ``‖X(W − Ŵ)‖ / ‖X W‖`` over the calibration inputs (wanda / sparsegpt; from ``H = XᵀX``,
    which both collect, Wanda only for this report).

    Pruning acts on the latent float weights; a 1.58-bit model's quantizer then sees the zeros (its absmean
    scale is taken over all entries, zeros included). Calibration runs with ``kernels`` off."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    from flax import nnx

    cfg = model.config
    model = with_config(model, kernels="off")  # the same Variables under kernels off
    needs_data = method != "magnitude"
    xs = None
    if needs_data:
        xs = [_embed(model, b) for b in (batches or [])]
        if not xs:
            raise ValueError(f"{method} needs calibration batches")
    report = []
    for i in track(range(cfg.n_layers), f"prune {method} {n}:{m}", unit="layers", enabled=progress):
        graphdef, state = _block_state(model, i)
        stats = _reduce(_block_stats_fn(graphdef, True), state, xs) if needs_data else {}
        block = nnx.merge(graphdef, state)
        for path, lin in block_linears(block):
            w = np.asarray(jax.device_get(lin.weight[...]))
            if method == "magnitude":
                w_hat = np.where(np.asarray(nm_mask(magnitude_score(w), n, m)), w, 0)
            elif method == "wanda":
                w_hat = np.where(np.asarray(nm_mask(wanda_score(w, stats[path]["act_norm"]), n, m)), w, 0)
            else:
                w_hat, _ = sparsegpt_prune(w.astype(np.float32), stats[path]["H"], n, m, blocksize, percdamp)
            rec = {"layer": i, "path": "/".join(map(str, path)), "kept": float(np.mean(w_hat != 0))}
            if needs_data:
                H, dw = stats[path]["H"], (w.astype(np.float64) - w_hat.astype(np.float64))
                if H is not None:
                    w64 = w.astype(np.float64)
                    rec["rel_err"] = float(np.sqrt(np.sum(dw * (H @ dw)) / max(np.sum(w64 * (H @ w64)), 1e-30)))
            report.append(rec)
            _set_weight(model, i, path, w_hat.astype(w.dtype))
        if needs_data and i + 1 < cfg.n_layers:  # the next block sees this block's pruned outputs
            graphdef, state = _block_state(model, i)
            forward = _block_forward_fn(graphdef)
            xs = [forward(state, x) for x in xs]
    return with_config(model, kernels=cfg.kernels), report


def calibration_batches(data_cfg, n_batches: int) -> list:
    """The first ``n_batches`` training batches' input tokens (int32 [B, seq_len]): the calibration data of
    one-shot pruning and of MoEfication router fitting."""
    splits = load_splits(data_cfg)
    it = iter(train_dataset(splits.train, data_cfg))
    return [split_batch(next(it))[0] for _ in range(n_batches)]
