"""LTE's math on arrays: neurons grouped into equal experts, the router losses, MoEfication router fitting.

The choices the paper leaves open (clustering features, balanced k-means, the efficiency and
separability forms, MoEfication labels) are written down in ``nn/lte.py``'s docstring, items 1-4 and 9.
"""

from __future__ import annotations

import functools

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

