"""N:M (default 2:4) semi-structured *weight* sparsity math: masks, scores, SLoRB, the AST decay.

Pure functions for the Adaptive Sparse Trainer (AST, Huang et al., arXiv 2407.20584, AAAI 2025) and its
one-shot baselines (magnitude, Wanda; SparseGPT is ``ops/sparsegpt.py``). Conventions:

* Weights are stored ``[in, out]`` (``SparseLinear.weight``, ``y = x @ W``), with ``scan_layers`` a
  leading layer axis ``[L, in, out]``. N:M groups run along the **input** axis (axis ``-2``) per output
  feature: in each group of ``m`` consecutive inputs ``n`` weights are kept. (The papers' PyTorch
  weights are ``[out, in]``: the same groups, transposed.)
* A mask is boolean, ``True`` = kept.

The model-level calibration and one-shot pruning that use these live in ``transforms/calibration.py``
(``qsparse prune`` is their command); AST's training hooks in ``train/methods/ast.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def decay_lambda(step, rate: float = 2e-8, warm: int = 3000, max_: float = 6e-5):
    """AST's annealed decay factor ``λ(t) = min(rate · min(t, warm), max_)``: linear rise for ``warm`` steps,
    then constant (the paper's LLaMA run: 2e-8 per step for 3000 steps, to 6e-5). jit-able in ``step``."""
    t = jnp.minimum(jnp.asarray(step, jnp.float32), warm)
    return jnp.minimum(rate * t, max_)


def decayed_grad(g: jax.Array, w: jax.Array, mask: jax.Array, lam) -> jax.Array:
    """``g + λ · (¬M) ⊙ W``: AST's (annealed SR-STE) decay, added to the gradient of the pruned weights
    only, so weights that keep losing shrink and ones whose gradient pushes back can regrow."""
    return g + (lam * jnp.where(mask, 0, w)).astype(g.dtype)


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
    """``S · (X x)``, added to the layer's output. ``x``: ``[..., in]``; ``S``: ``[in/k, out]``; ``X``: None (the
    fixed projection: each group of ``k`` consecutive inputs summed, ``(Xx)_g = Σ_{i<k} x_{gk+i}``) or the
    full trainable projection ``[in/k, in]`` (the authors' ``x_proj``, :func:`slorb_x_init`), ``(Xx)_g = Σ_j X_gj x_j``;
    then ``y_o = Σ_g (Xx)_g · S_go``."""
    *lead, d_in = x.shape
    if d_in % k:
        raise ValueError(f"SLoRB groups of k={k} need the input dimension ({d_in}) to be a multiple of k")
    if X is None:
        z = jnp.sum(x.reshape(*lead, d_in // k, k), axis=-1)
    else:
        if X.shape != (d_in // k, d_in):
            raise ValueError(f"SLoRB X must be [in/k, in] = {(d_in // k, d_in)}, got {tuple(X.shape)}")
        z = jnp.einsum("...j,gj->...g", x, X.astype(x.dtype))
    return jnp.einsum("...g,go->...o", z, S.astype(x.dtype))


def slorb_x_init(in_features: int, k: int = 16, dtype=jnp.float32) -> jax.Array:
    """The trainable ``X`` ``[in/k, in]`` of :func:`slorb_apply` at initialization: the group sum, ones on
    the block diagonal (``X_gj = 1`` iff ``gk <= j < (g+1)k``), zeros elsewhere; every entry trains (the
    authors' ``x_proj`` with ``train_proj``, thu-ml/Adaptive-Sparse-Trainer ``sparse_modeling.py``)."""
    if in_features % k:
        raise ValueError(f"SLoRB groups of k={k} need the input dimension ({in_features}) to be a multiple of k")
    groups = jnp.arange(in_features) // k
    return (groups[None, :] == jnp.arange(in_features // k)[:, None]).astype(dtype)


def slorb_param_count(in_features: int, out_features: int, k: int = 16, trainable_x: bool = False) -> int:
    """Extra parameters of one linear: ``S`` has ``in/k · out``; a trainable ``X`` adds ``in/k · in``."""
    return (in_features // k) * (out_features + (in_features if trainable_x else 0))


def slorb_model_params(config, k: int = 16, trainable_x: bool = False) -> int:
    """SLoRB parameters of every block linear of a ``ModelConfig`` (``Σ |W|/k``: 1/16 ≈ 6 % of the block
    projections at k = 16, the paper's "about 6 %"; a trainable ``X`` adds ``Σ in²/k``, one per linear as
    in the authors' code: about as much again at LLaMA2-7B's shapes)."""
    c = config
    q_out, kv_out = c.n_heads * c.head_size, c.kv_heads * c.head_size
    shapes = [(c.dim, q_out), (c.dim, kv_out), (c.dim, kv_out), (q_out, c.dim),
              (c.dim, c.hidden_dim), (c.dim, c.hidden_dim), (c.hidden_dim, c.dim)]
    return c.n_layers * sum(slorb_param_count(i, o, k, trainable_x) for i, o in shapes)


_JIT_CACHE: dict = {}

