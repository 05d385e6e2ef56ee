"""LTE's math on arrays: neurons grouped into equal experts, the router losses, MoEfication router fitting,
and the selected experts of a batch run as one grouped matmul.

The choices the paper leaves open (clustering features, balanced k-means, the efficiency and
separability forms, MoEfication labels) are written down in ``nn/lte.py``'s docstring, items 1-4 and 9;
which execution of the selected experts runs where, item 8.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError

HIST_BINS = 20  # router-score histogram: bins of width 0.05 over [0, 1]


def _balanced_assign(sim: np.ndarray, size: int) -> np.ndarray:
    """Cluster of every row of ``sim`` [n, k] (higher = closer), each cluster exactly ``size`` rows."""
    n, k = sim.shape
    labels = np.full(n, -1, np.int64)
    cap = np.full(k, size, np.int64)
    while (free := np.flatnonzero(labels < 0)).size:
        s = np.where(cap[None, :] > 0, sim[free], -np.inf)
        best = np.argmax(s, axis=1)
        score = s[np.arange(free.size), best]
        order = np.lexsort((-score, best))  # by cluster, most similar first
        b = best[order]
        start = np.searchsorted(b, b, side="left")
        rank = np.arange(b.size) - start
        take = rank < cap[b]
        labels[free[order[take]]] = b[take]
        np.subtract.at(cap, b[take], 1)
    return labels


def balanced_kmeans(vectors: np.ndarray, n_clusters: int, *, iters: int = 25, seed: int = 0) -> np.ndarray:
    """Labels [n] of cosine k-means with every cluster exactly ``n / n_clusters`` members (choice 2)."""
    x = np.asarray(vectors, np.float64)
    n = x.shape[0]
    if n % n_clusters:
        raise ConfigError(f"{n} neurons do not split into {n_clusters} equal experts")
    size = n // n_clusters
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    c = x[rng.choice(n, n_clusters, replace=False)]
    labels = None
    for _ in range(iters):
        new = _balanced_assign(x @ c.T, size)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        c = np.stack([x[labels == j].mean(0) for j in range(n_clusters)])
        c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return labels


def group_experts(w_gate, expert_size: int, *, seed: int = 0, iters: int = 25) -> np.ndarray:
    """The permutation [hidden] that makes experts contiguous: expert ``e`` is neurons
    ``perm[e·s:(e+1)·s]`` of ``w_gate`` [dim, hidden] (clustered on its normalized columns, choice 1)."""
    w = np.asarray(w_gate, np.float32)
    hidden = w.shape[1]
    if hidden % expert_size:
        raise ConfigError(f"model.lte.expert_size={expert_size} must divide hidden_dim={hidden}")
    labels = balanced_kmeans(w.T, hidden // expert_size, iters=iters, seed=seed)
    return np.argsort(labels, kind="stable")


def experts_of(perm: np.ndarray, expert_size: int) -> np.ndarray:
    """[E, s]: the original neuron indices of each expert."""
    return np.asarray(perm).reshape(-1, expert_size)


def efficiency_loss(scores: jax.Array, kind: str = "mean") -> jax.Array:
    """Per-token efficiency loss [...]: mean router score (or mean square; choice 3)."""
    return jnp.mean(scores if kind == "mean" else scores * scores, axis=-1)


def separability_loss(scores: jax.Array, tau: float = 0.5, eps: float = 0.01) -> jax.Array:
    """Per-token separability loss [...]: mean of ``ε / ((G − τ)² + ε)`` (1 at τ, → 0 away; choice 4)."""
    d = scores - tau
    return jnp.mean(eps / (d * d + eps), axis=-1)


def score_histogram(scores: jax.Array) -> jax.Array:
    """Counts of router scores in ``HIST_BINS`` equal bins of [0, 1] (float32 [HIST_BINS])."""
    b = jnp.clip((scores * HIST_BINS).astype(jnp.int32), 0, HIST_BINS - 1)
    return jnp.sum(jax.nn.one_hot(b.reshape(-1), HIST_BINS, dtype=jnp.float32), axis=0)


def moefication_labels(h: jax.Array, expert_size: int, top_k: int) -> jax.Array:
    """[N, E] 0/1: the ``top_k`` experts of each token by the L2 norm of its slice of ``h`` [N, hidden]."""
    n = h.shape[0]
    norms = jnp.linalg.norm(h.astype(jnp.float32).reshape(n, -1, expert_size), axis=-1)
    _, idx = jax.lax.top_k(norms, top_k)
    return jnp.sum(jax.nn.one_hot(idx, norms.shape[1], dtype=jnp.float32), axis=-2)


@functools.partial(jax.jit, static_argnames=("steps",))
def fit_router(x: jax.Array, labels: jax.Array, w0: jax.Array, steps: int = 300, lr: float = 1e-2) -> jax.Array:
    """A linear router ``W`` [dim, E] fit by Adam on binary cross-entropy of ``σ(x W)`` vs ``labels`` (full batch)."""
    import optax

    opt = optax.adam(lr)
    x = x.astype(jnp.float32)

    def loss(w):
        return jnp.mean(optax.sigmoid_binary_cross_entropy(x @ w, labels))

    def step(carry, _):
        w, st = carry
        g = jax.grad(loss)(w)
        u, st = opt.update(g, st, w)
        return (optax.apply_updates(w, u), st), None

    (w, _), _ = jax.lax.scan(step, (w0.astype(jnp.float32), opt.init(w0.astype(jnp.float32))), None, length=steps)
    return w



# --- the selected experts of a batch as a grouped matmul (inference; nn/lte.py choice 8) ---------------------
# The layout is the one MoE layers build for a grouped matmul (MaxText's ``RoutedMoE.permute`` / ``sparse_matmul``
# with ``jax.lax.ragged_dot``): every (token, expert) pair in a static-size array sorted by expert, group sizes
# per expert, results added back to their tokens. LTE differs from top-k MoE only in that a token selects a
# variable number of experts (``G > τ``), so the static size is the worst case, T·E rows, all experts of all tokens.


class ExpertRows(NamedTuple):
    """The (token, expert) pairs of a selection sorted by expert (see :func:`expert_rows`)."""

    token: jax.Array  # [R] int32: the token of each row; T (out of range) on a padding row
    group_sizes: jax.Array  # [E] int32: pairs per expert
    tile_expert: jax.Array  # [R // tile] int32: the expert of each tile of rows (any expert on padding tiles)
    n_tiles: jax.Array  # int32: tiles holding pairs (the rest is padding)


def expert_rows(sel: jax.Array, tile: int = 1) -> ExpertRows:
    """The pairs of ``sel`` [T, E] (bool: token ``t`` runs expert ``e``) sorted by expert, each expert's rows
    padded to a multiple of ``tile`` so every tile of ``tile`` rows belongs to one expert. ``R = T·E`` rows
    for ``tile=1`` (the pairs first, then padding: the ``ragged_dot`` layout), ``T·E + E·(tile−1)`` rounded up
    to ``tile`` otherwise. Tokens keep their order within an expert."""
    T, E = sel.shape
    n = jnp.sum(sel, axis=0, dtype=jnp.int32)
    tiles = (n + tile - 1) // tile
    first = (jnp.cumsum(tiles) - tiles) * tile  # the first row of each expert
    rank = jnp.cumsum(sel, axis=0, dtype=jnp.int32) - 1  # [T, E]: the token's place among the expert's tokens
    R = T * E if tile == 1 else -(-(T * E + E * (tile - 1)) // tile) * tile
    row = jnp.where(sel, first[None, :] + rank, R).reshape(-1)
    who = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[:, None], (T, E)).reshape(-1)
    token = jnp.full((R,), T, jnp.int32).at[row].set(who, mode="drop")
    tile_expert = jnp.repeat(jnp.arange(E, dtype=jnp.int32), tiles, total_repeat_length=R // tile)
    return ExpertRows(token, n, tile_expert, jnp.sum(tiles))


def _to_tokens(values: jax.Array, token: jax.Array, n_tok: int) -> jax.Array:
    """Rows added to their tokens: [n_tok, ...]; padding rows (token ``n_tok``) are dropped."""
    return jnp.zeros((n_tok, *values.shape[1:]), values.dtype).at[token].add(values, mode="drop")


def grouped_ffn(x: jax.Array, sel: jax.Array, w_gate_up: jax.Array, w_down: jax.Array,
                act: Callable[[jax.Array], jax.Array], *, tile: int | None = None,
                norm_weight: jax.Array | None = None, count_zeros: bool = True):
    """``Σ_{e: sel[t, e]} E_e(x_t)`` for every token of ``x`` [T, d]: expert ``e`` is
    ``(up_e(x) ⊙ act(gate_e(x))) · W_down,e`` with ``w_gate_up`` [2, E, d, s] (expert-major gate, up) and
    ``w_down`` [E, s, d_out]. Only the selected (token, expert) pairs are multiplied, as a grouped matmul:

    - ``tile=None``: two ``jax.lax.ragged_dot`` calls over the pairs sorted by expert (a native grouped
      matmul on TPU and GPU; XLA:CPU expands it to a dense product per group, E times the dense FLOPs);
    - ``tile=m``: a loop over the tiles of ``m`` rows that hold pairs (a dynamic trip count), each one
      expert's gate/up and down blocks times its ``m`` gathered tokens (a grouped matmul XLA:CPU runs well).

    ``norm_weight`` [E, s] (SubLN before the down projection): each neuron is scaled by its weight and the
    sum of squares of each token's hidden vector is returned to finish the RMS norm (a per-token factor, so
    it is applied after the down projection). Returns ``(out [T, d_out] float32, ss [T] float32,
    zeros)``: ``zeros`` counts the zero entries of the [T, E·s] down-projection input (the skipped experts'
    neurons included; 0 without ``count_zeros`` in the tile loop)."""
    T = x.shape[0]
    E, s = w_gate_up.shape[1], w_gate_up.shape[-1]
    dt = jnp.result_type(x.dtype, w_gate_up.dtype)
    rows = expert_rows(sel, tile or 1)

    def hidden(tok, e):  # the rows' tokens [m] → h [m, s] (zero on padding rows), Σh² per row, zeros in h
        xr = jnp.take(x, tok, axis=0, mode="fill", fill_value=0).astype(dt)
        if tile:
            up, gate = xr @ w_gate_up[1, e].astype(dt), xr @ w_gate_up[0, e].astype(dt)
        else:
            up, gate = (jax.lax.ragged_dot(xr, w_gate_up[i].astype(dt), rows.group_sizes) for i in (1, 0))
        valid = (tok < T)[:, None]
        h = jnp.where(valid, up * act(gate), 0)
        zeros = jnp.sum((h == 0) & valid, dtype=jnp.float32) if count_zeros or not tile else 0.0
        ss = jnp.sum(jnp.square(h.astype(jnp.float32)), axis=-1)
        if norm_weight is not None:
            h = (h.astype(jnp.float32) * norm_weight[e]).astype(h.dtype)
        return h.astype(w_down.dtype), ss, zeros

    skipped = ((T * E - jnp.sum(rows.group_sizes)) * s).astype(jnp.float32)  # neurons of unselected pairs
    if tile is None:
        h, ss, zeros = hidden(rows.token, rows.tile_expert)  # tile 1: tile_expert is each row's expert
        y = jax.lax.ragged_dot(h, w_down, rows.group_sizes, preferred_element_type=jnp.float32)
        return _to_tokens(y, rows.token, T), _to_tokens(ss, rows.token, T), zeros + skipped

    def body(j, carry):
        out, ss, zeros = carry
        tok = jax.lax.dynamic_slice_in_dim(rows.token, j * tile, tile)
        e = rows.tile_expert[j]
        h, hss, hz = hidden(tok, e)
        y = (h @ w_down[e]).astype(jnp.float32)
        return out.at[tok].add(y, mode="drop"), ss.at[tok].add(hss, mode="drop"), zeros + hz

    init = (jnp.zeros((T, w_down.shape[-1]), jnp.float32), jnp.zeros((T,), jnp.float32), jnp.zeros((), jnp.float32))
    out, ss, zeros = jax.lax.fori_loop(0, rows.n_tiles, body, init)
    return out, ss, (zeros + skipped) if count_zeros else zeros
