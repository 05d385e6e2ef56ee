"""N:M (default 2:4) semi-structured *weight* sparsity: masks, scores, one-shot pruning, AST pieces.

Pure functions for the Adaptive Sparse Trainer (AST, Huang et al., arXiv 2407.20584, AAAI 2025) and its
one-shot baselines (magnitude, Wanda, SparseGPT). Conventions:

* Weights are stored ``[in, out]`` (``SparseLinear.weight``, ``y = x @ W``), with ``scan_layers`` a
  leading layer axis ``[L, in, out]``. N:M groups run along the **input** axis (axis ``-2``) per output
  feature: in each group of ``m`` consecutive inputs ``n`` weights are kept. (The papers' PyTorch
  weights are ``[out, in]``: the same groups, transposed.)
* A mask is boolean, ``True`` = kept.

Model-level helpers (:func:`block_linears`, :func:`calibrate`, :func:`prune_model`) run on an
``nnx`` :class:`~qsparse_jax.model.Transformer`; ``python -m qsparse_jax.prune`` is their CLI.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("magnitude", "wanda", "sparsegpt")


# --- masks and scores ------------------------------------------------------------------------------

def _check_groups(shape, m: int, what: str = "scores"):
    if len(shape) < 2:
        raise ValueError(f"{what} must be [in, out] or [L, in, out], got shape {tuple(shape)}")
    if m < 1 or shape[-2] % m:
        raise ValueError(f"N:M groups of m={m} need the input dimension (axis -2, {shape[-2]}) to be a multiple of m")


def nm_mask(scores: jax.Array, n: int = 2, m: int = 4) -> jax.Array:
    """Boolean mask of ``scores``' shape keeping, per output feature, the ``n`` highest-scoring of each
    group of ``m`` consecutive inputs (axis ``-2``): exactly ``n`` per group for any input.

    Ties go to the lower input index (so an all-zero group keeps its first ``n``); NaN scores count as
    ``-inf``. Each element's rank inside its group is counted by ``m·(m−1)`` elementwise comparisons —
    no sort — so it is cheap to recompute inside a jitted train step and keeps the weights' sharding.
    ``kept_i  ⇔  #{j : s_j > s_i or (s_j = s_i and j < i)} < n``, a strict total order, hence exactly ``n``.
    """
    _check_groups(scores.shape, m)
    if not 0 <= n <= m:
        raise ValueError(f"N:M needs 0 <= n <= m, got n={n}, m={m}")
    s = jnp.asarray(scores)
    if jnp.issubdtype(s.dtype, jnp.floating):
        s = jnp.where(jnp.isnan(s), -jnp.inf, s)
    *lead, d_in, d_out = s.shape
    g = s.reshape(*lead, d_in // m, m, d_out)
    cols = [g[..., i, :] for i in range(m)]
    kept = []
    for i in range(m):
        rank = jnp.zeros(cols[i].shape, jnp.int32)
        for j in range(m):
            if j != i:
                beats = (cols[j] > cols[i]) | (cols[j] == cols[i]) if j < i else cols[j] > cols[i]
                rank = rank + beats.astype(jnp.int32)
        kept.append(rank < n)
    return jnp.stack(kept, axis=-2).reshape(s.shape)


def magnitude_score(w: jax.Array) -> jax.Array:
    """``|W|`` (magnitude pruning; AST's score for LLaMA)."""
    return jnp.abs(w)


def wanda_score(w: jax.Array, act_norm: jax.Array) -> jax.Array:
    """Wanda (Sun et al. 2023, arXiv 2306.11695, Eq. 1): ``S_ij = |W_ij| · ‖X_j‖₂``, ``X_j`` the j-th input
    feature over the calibration tokens. ``act_norm``: ``[in]`` (or ``[L, in]`` for stacked ``[L, in, out]``).

    We pass ``‖x_j‖₂`` over all calibration tokens (:func:`calibrate`'s ``act_norm``). The authors' code
    (``lib/layerwrapper.py``) uses ``sqrt(Σ‖x_j‖² / n_sequences)``, the same up to a per-layer constant,
    which leaves every N:M mask unchanged."""
    return jnp.abs(w) * jnp.asarray(act_norm)[..., :, None].astype(jnp.abs(w).dtype)


def flip_rate(old_mask: jax.Array, new_mask: jax.Array) -> jax.Array:
    """Fraction of positions whose mask changed (float32 scalar). One swap inside a 2:4 group changes two
    positions (one weight leaves, one enters)."""
    return jnp.mean((jnp.asarray(old_mask) != jnp.asarray(new_mask)).astype(jnp.float32))


def group_zero_fraction(x: jax.Array, m: int = 4, reduce: str = "min") -> jax.Array:
    """Fraction of pruned entries in each group of ``m`` consecutive inputs: of a boolean mask (``False`` =
    pruned) or of weights (``0`` = pruned). ``reduce``: ``"min"`` (the least sparse group: N:M holds iff
    ``>= (m − n)/m``), ``"mean"``, or ``"none"`` (``[..., in/m, out]``)."""
    x = jnp.asarray(x)
    _check_groups(x.shape, m, "x")
    zero = ~x if x.dtype == jnp.bool_ else x == 0
    *lead, d_in, d_out = x.shape
    frac = jnp.mean(zero.reshape(*lead, d_in // m, m, d_out).astype(jnp.float32), axis=-2)
    if reduce == "none":
        return frac
    if reduce not in ("min", "mean"):
        raise ValueError(f"reduce must be min, mean or none, got {reduce!r}")
    return jnp.min(frac) if reduce == "min" else jnp.mean(frac)


# --- AST: annealed decay of the pruned weights ----------------------------------------------------

def decay_lambda(step, rate: float = 2e-8, warm: int = 3000, max_: float = 6e-5):
    """AST's annealed decay factor ``λ(t) = min(rate · min(t, warm), max_)``: linear rise for ``warm`` steps,
    then constant (the paper's LLaMA run: 2e-8 per step for 3000 steps, to 6e-5). jit-able in ``step``."""
    t = jnp.minimum(jnp.asarray(step, jnp.float32), warm)
    return jnp.minimum(rate * t, max_)


def decayed_grad(g: jax.Array, w: jax.Array, mask: jax.Array, lam) -> jax.Array:
    """``g + λ · (¬M) ⊙ W``: AST's (annealed SR-STE) decay, added to the gradient of the pruned weights
    only, so weights that keep losing shrink and ones whose gradient pushes back can regrow."""
    return g + (lam * jnp.where(mask, 0, w)).astype(g.dtype)


# --- SLoRB: sparse low-rank boosting --------------------------------------------------------------

def slorb_init(w: jax.Array, mask: jax.Array, k: int = 16) -> jax.Array:
    """AST's SLoRB ``S`` ``[in/k, out]`` (``[L, in/k, out]`` stacked): per output feature, the mean over each
    group of ``k`` consecutive inputs of the pruned weights ``W ⊙ ¬M``, taken over all ``k`` positions
    (kept ones count as 0): ``S_go = Σ_{j∈g} W_jo·¬M_jo / k``. With this choice ``S · (X x)`` equals the
    pruned weights' contribution ``Σ_j W_jo ¬M_jo x_j`` exactly whenever the inputs of a group are equal."""
    _check_groups(w.shape, k, "w")
    pruned = jnp.where(mask, 0, w)
    *lead, d_in, d_out = w.shape
    return jnp.sum(pruned.reshape(*lead, d_in // k, k, d_out), axis=-2) / k


def slorb_apply(x: jax.Array, S: jax.Array, k: int = 16, X: jax.Array | None = None) -> jax.Array:
    """``S · (X x)``: ``X`` sums each group of ``k`` consecutive inputs (a block of ones, ``[in/k, k]``
    per-group weights when given, initialized to ones when trainable): ``(Xx)_g = Σ_{i<k} X_gi · x_{gk+i}``,
    then ``y_o = Σ_g (Xx)_g · S_go``. ``x``: ``[..., in]``; ``S``: ``[in/k, out]``. Added to the layer's output."""
    *lead, d_in = x.shape
    if d_in % k:
        raise ValueError(f"SLoRB groups of k={k} need the input dimension ({d_in}) to be a multiple of k")
    xg = x.reshape(*lead, d_in // k, k)
    z = jnp.sum(xg, axis=-1) if X is None else jnp.einsum("...gi,gi->...g", xg, X.astype(x.dtype))
    return jnp.einsum("...g,go->...o", z, S.astype(x.dtype))


def slorb_x_init(in_features: int, k: int = 16, dtype=jnp.float32) -> jax.Array:
    """The trainable ``X`` of :func:`slorb_apply` at initialization: ones ``[in/k, k]`` (plain group sums)."""
    if in_features % k:
        raise ValueError(f"SLoRB groups of k={k} need the input dimension ({in_features}) to be a multiple of k")
    return jnp.ones((in_features // k, k), dtype)


def slorb_param_count(in_features: int, out_features: int, k: int = 16, trainable_x: bool = False) -> int:
    """Extra parameters of one linear: ``S`` has ``in/k · out``; a trainable ``X`` adds ``in``."""
    return (in_features // k) * out_features + (in_features if trainable_x else 0)


def slorb_model_params(config, k: int = 16, trainable_x: bool = False) -> int:
    """SLoRB parameters of every block linear of a ``ModelConfig`` (``Σ |W|/k``: 1/16 ≈ 6 % of the block
    projections at k = 16, the paper's "about 6 %")."""
    c = config
    q_out, kv_out = c.n_heads * c.head_size, c.kv_heads * c.head_size
    shapes = [(c.dim, q_out), (c.dim, kv_out), (c.dim, kv_out), (q_out, c.dim),
              (c.dim, c.hidden_dim), (c.dim, c.hidden_dim), (c.hidden_dim, c.dim)]
    return c.n_layers * sum(slorb_param_count(i, o, k, trainable_x) for i, o in shapes)


# --- SparseGPT --------------------------------------------------------------------------------------

def sparsegpt_prune(w, H, n: int = 2, m: int = 4, blocksize: int = 128, percdamp: float = 0.01):
    """SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774, Alg. 1) N:M pruning of one layer:
    ``(w_pruned, mask)``, ``w_pruned`` in ``w``'s dtype with exactly ``n`` of every ``m`` kept.

    ``w``: ``[in, out]``; ``H = Σ x xᵀ`` ``[in, in]`` over the calibration inputs of this layer (any positive
    scale: the damping is relative). In the paper's ``[out, in]`` orientation ``W = wᵀ``: minimizing
    ``‖W X − Ŵ X‖²`` row by row with the OBS update. Steps (numpy, float64):

    1. dead inputs (``H_jj = 0``) get ``H_jj = 1`` (their weights stay, as nothing measures them);
    2. damping ``H += percdamp · mean(diag H) · I``; ``U = chol(H⁻¹)ᵀ`` (upper Cholesky factor of the inverse);
    3. columns (inputs) in blocks of ``blocksize``; at the first column of each group of ``m`` the mask keeps
       the ``n`` largest ``W_j² / U_jj²`` (the OBS saliency), ties to the lower index like :func:`nm_mask`;
    4. each column ``j`` is zeroed where pruned, its error ``e = (W_j − Ŵ_j) / U_jj`` is pushed onto the block's
       later columns, ``W_{j:} −= e · U_{j, j:}``, and after the block onto every later column (lazy batch).

    Follows the authors' ``SparseGPT.fasterprune`` (github.com/IST-DASLab/sparsegpt, ``sparsegpt.py``), written
    anew; two differences: dead inputs keep their weights (the authors zero them, which can leave a group
    with fewer than ``n`` nonzeros), and ties in the saliency go to the lower index (``torch.topk``'s order).
    """
    w = np.asarray(w)
    _check_groups(w.shape, m, "w")
    if w.ndim != 2:
        raise ValueError(f"sparsegpt_prune takes one layer's [in, out] weight, got shape {w.shape}")
    if blocksize % m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of m={m}")
    d_in = w.shape[0]
    H = np.array(H, np.float64, copy=True)
    if H.shape != (d_in, d_in):
        raise ValueError(f"H must be [{d_in}, {d_in}] for a weight of shape {w.shape}, got {H.shape}")
    W = w.astype(np.float64).T.copy()  # [out, in], the paper's orientation
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    H[np.diag_indices(d_in)] += percdamp * np.mean(np.diag(H))
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # U, upper triangular with H⁻¹ = Uᵀ U
    keep = np.zeros_like(W, dtype=bool)
    for b0 in range(0, d_in, blocksize):
        b1 = min(b0 + blocksize, d_in)
        W1, U1 = W[:, b0:b1].copy(), Hinv[b0:b1, b0:b1]
        Err1 = np.zeros_like(W1)
        for i in range(b1 - b0):
            if i % m == 0:
                sal = W1[:, i:i + m] ** 2 / np.diag(U1)[i:i + m][None, :] ** 2
                keep[:, b0 + i:b0 + i + m] = _nm_rows(sal, n)
            d = U1[i, i]
            q = np.where(keep[:, b0 + i], W1[:, i], 0.0)
            err = (W1[:, i] - q) / d
            W1[:, i:] -= np.outer(err, U1[i, i:])
            W1[:, i] = q
            Err1[:, i] = err
        W[:, b0:b1] = W1
        W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]
    W = np.where(keep, W, 0.0)
    return W.T.astype(w.dtype), keep.T


def _nm_rows(scores: np.ndarray, n: int) -> np.ndarray:
    """numpy: per row of ``scores`` [rows, m] keep the ``n`` largest, ties to the lower index (as nm_mask)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :n]
    keep = np.zeros(scores.shape, bool)
    np.put_along_axis(keep, order, True, axis=1)
    return keep


def reconstruction_error(w, w_hat, X) -> float:
    """``‖(W − Ŵ)ᵀ Xᵀ‖_F`` for ``X`` ``[tokens, in]``: how far the pruned layer's outputs are from the dense ones."""
    X = np.asarray(X, np.float64)
    return float(np.linalg.norm(X @ (np.asarray(w, np.float64) - np.asarray(w_hat, np.float64))))


# --- model-level: calibration and one-shot pruning -------------------------------------------------

def block_linears(block) -> list[tuple[tuple, object]]:
    """``(path inside the block, SparseLinear)`` of every linear of a Block (q, k, v, o, gate, up, down)."""
    from flax import nnx

    from .layers import SparseLinear

    return [(tuple(p), mod) for p, mod in nnx.iter_modules(block) if isinstance(mod, SparseLinear)]


@contextlib.contextmanager
def _record_inputs(record: Callable):
    """Within the block: every ``SparseLinear.project(xs)`` call also calls ``record(linear, xs)``.

    ``xs`` is the tensor the matmul consumes (after the input norm, top-K and int8 fake-quant, with
    ``kernels`` off), so projections sharing an input (q/k/v, gate/up) see the same tensor. Implemented by
    temporarily replacing the class method while a (traced) forward runs: the model code stays untouched."""
    from .layers import SparseLinear

    original = SparseLinear.project

    def project(self, xs):
        record(self, xs)
        return original(self, xs)

    SparseLinear.project = project
    try:
        yield
    finally:
        SparseLinear.project = original


_JIT_CACHE: dict = {}


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
    from .layers import _dtype

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

    from .model import with_config

    cfg = model.config
    model = with_config(model, kernels="off")  # the same Variables under kernels off
    needs_data = method != "magnitude"
    xs = None
    if needs_data:
        xs = [_embed(model, b) for b in (batches or [])]
        if not xs:
            raise ValueError(f"{method} needs calibration batches")
    layers = range(cfg.n_layers)
    if progress:
        from tqdm import tqdm

        layers = tqdm(layers, desc=f"{method} {n}:{m}", unit="layer")
    report = []
    for i in layers:
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
