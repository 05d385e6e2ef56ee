"""LTE: Learn-To-be-Efficient (arXiv 2402.06126, NeurIPS 2024; SEEDS §3) — learned structured activation
sparsity: the FFN's neurons grouped into experts, a sigmoid router per FFN, experts skipped at inference.

Pieces (all usable on their own):

- **Experts** (:func:`group_experts`, :func:`permute_ffn`, :func:`permute_model_params`): a GLU neuron is a
  gate/up column pair and its down row; neurons are grouped into equal-size experts by balanced k-means on
  their normalized input-weight vectors (MoEfication's grouping) and the weights are permuted so expert
  ``e`` is the contiguous slice ``[e·s, (e+1)·s)`` of the hidden axis. The permutation does not change the
  model's function.
- **Router and stages** (:class:`LTEFeedForward`, picked by ``Block`` when ``model.lte.enabled``): scores
  ``G(x)_i = σ(x · W_r,i)``. Stage 1: output ``Σ_i G(x)_i · E_i(x)``, loss + ``η``·efficiency +
  ``λ_sep``·separability. Stage 2: expert ``i`` runs iff ``G(x)_i > τ``, routers frozen (:class:`LTEMethod`).
- **Structured execution** (``model.lte.execution: gather``): only the selected experts' gate/up columns
  and down rows are read and multiplied: for one token (decode) its selected experts; for a batch the
  union of the tokens' experts (reported as ``lte_union``), each token still masked to its own experts.
- **MoEfication baseline** (:func:`fit_moefication_routers`): routers fit to a *dense* model (not trained
  with it) to predict which experts are active; the ``top_k`` best-scored experts are kept per token.
- **From a dense model** (:func:`to_lte`, ``python -m qsparse_jax.lte convert``): a dense checkpoint or HF
  directory → grouped, permuted, routers added → a checkpoint for ``train.py --init_from`` (the routers
  are not a method-added leaf: ``--init_from`` of the dense checkpoint itself would skip the grouping).
- **Training hooks** (:class:`LTEMethod`): the trainer's method interface (frozen routers in stage 2, the
  efficiency and separability terms, sparsity / FLOPs / score-histogram metrics).

Choices the paper leaves open (or that its public descriptions do not pin down), and why:

1. *Clustering features*: the paper clusters each neuron's column of ``W_1``. For a GLU there are two
   input matrices; we cluster on the **gate** column (``w_gate[:, j]``), the one that goes through the
   activation and so decides whether the neuron is (near) zero — the quantity an expert's router predicts.
   Vectors are L2-normalized (cosine k-means), as MoEfication does, so weight scale does not dominate.
2. *Balanced k-means*: the paper does not give the algorithm. Ours: k-means++-free random init from the
   data, then each iteration assigns neurons to centroids greedily under an exact capacity of ``s``
   neurons per cluster (every unassigned neuron proposes its most similar non-full cluster; each cluster
   accepts its most similar proposals up to its remaining capacity; repeat), then re-centres
   (normalized mean). 25 iterations or until the assignment stops changing; seeded, deterministic.
3. *Efficiency loss*: the paper's text (as SEEDS §3 digests it) is "mean router score", pushing experts
   off; one secondary summary renders it as a mean of *squared* scores. Default ``efficiency: mean``:
   ``L_eff = (1/(L·N)) Σ_l Σ_i G_l(x)_i`` per token, averaged over tokens; ``mean_square`` is the option.
   The mean (L1 on non-negative scores) keeps pushing scores all the way to 0, while the square's push
   vanishes near 0, so the mean gives the sparsity that ``η`` asks for more directly.
4. *Separability loss*: the paper wants scores pushed away from ``τ`` and (as we read it) penalizes the
   inverse squared distance ``1/(G − τ)²``, which is unbounded at ``τ``. We use the bounded, smoothed form
   ``L_sep = (1/(L·N)) Σ_l Σ_i ε / ((G_l(x)_i − τ)² + ε)`` with ``ε = sep_eps = 0.01``: it equals
   ``ε ·`` the paper's term away from ``τ`` (same gradient direction), is 1 at ``G = τ`` and ≈ 0 far from
   it, so its weight ``separability`` is on the scale of the task loss (default 0.1) and never overflows.
5. *Router*: one linear layer, no bias (``x · W_r`` as the paper writes it), float32 scores, weights
   ``N(0, init_std)`` (truncated at 2σ), so every score starts near 0.5 = τ: the model starts at half its
   dense FFN output and stage 1 moves each expert's score to one side. The router reads the FFN input
   (after ``mlp_norm``), the same tensor the experts read.
6. *Stage 2 output*: ``Σ_{i: G_i > τ} E_i(x)`` — the selected experts at full weight, not scaled by
   ``G`` (the "hard threshold" of the paper; this is what a kernel that skips experts computes). The
   score goes through a step function, so no gradient reaches the router; it is also frozen (optax mask).
7. *Inference* (``execution: gather``) is always hard (``G > τ``, or top-k for MoEfication), whatever the
   stage: after stage 1 alone the model is evaluated the way it would be served.
8. *Execution* (gather): a loop (``fori_loop`` with a dynamic trip count) over the union of the batch's
   selected experts, each iteration one expert's contiguous blocks; at batch 1 the union is the token's
   selection. The gate/up weights are kept a second time expert-major ``[2, E, dim, s]`` for inference
   (:class:`ExpertMajor`, made by :func:`with_execution`; a deployment would store only that layout),
   because gathering the selected columns of ``[dim, hidden]`` (or blocks of ``[E, dim, s]``) on XLA:CPU
   costs 2.7–16× the dense FFN, while the loop over contiguous blocks is the fastest skip we found. It is
   still no faster than dense on XLA:CPU (measured, idle 2-core CPU, batch 1, half the experts: 0.9× of
   dense at dim 1024 / hidden 2816, 0.5× at 2048 / 5632 and 4096 / 11008): the dense matmul uses every
   core, the loop one core, and XLA copies each dynamic slice before its dot. The paper's 25 % latency cut
   needs a kernel that reads the selected blocks in place (its Triton kernel); none is here.
9. *MoEfication baseline*: label of expert ``e`` for a token = 1 iff ``e`` is among the token's
   ``top_k`` experts by the L2 norm of its slice of ``up ⊙ act(gate)`` (works for SiLU, where nothing is
   exactly zero, as well as ReLU²); routers fit by Adam on binary cross-entropy over calibration tokens,
   one linear router per layer as LTE's (MoEfication itself uses a 2-layer MLP; one layer keeps the
   router FLOPs equal to LTE's, so the comparison is about training, not router size). Top-k at inference.
10. *Losses over tokens*: the router terms are summed over every input position of the batch (the
    router sees every token, padding included in SFT batches), each layer's term averaged over layers.
11. *Where LTE does not apply*: the gather path needs kernels off, no top-K, BitLinear norm or int8
    quantization at the down input and no SLoRB (those see the whole hidden vector); the
    masked path (training) works with everything ``FeedForward`` supports. Block top-K at the down input
    is not permutation-invariant, so :func:`to_lte` refuses models with ``sparsity.block_size`` and
    ``sparsity.down``.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ConfigError, LTEConfig, ModelConfig
from .layers import FeedForward, _dtype, glu_activation
from .sharding import constrain

HIST_BINS = 20  # router-score histogram: bins of width 0.05 over [0, 1]


# --- experts: balanced k-means and the permutation --------------------------------------------------

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


# --- the module -------------------------------------------------------------------------------------

class LTEFeedForward(FeedForward):
    """The GLU FFN (``FeedForward``'s parameters, same names) with experts and a sigmoid router.

    ``__call__(x, stats)`` → output; with ``stats`` (a dict) it adds, summed over tokens: ``gate_up`` /
    ``down`` zero counts (as ``FeedForward``), ``lte_eff`` (Σ per-token efficiency loss), ``lte_sep``
    (Σ per-token separability loss), ``lte_active`` (selected experts: ``G > τ`` / top-k), ``lte_tokens``,
    ``lte_hist_00`` … ``lte_hist_19`` (score histogram, width 0.05) and, with ``execution: gather``,
    ``lte_union`` (experts read for the batch). Keys are per-layer scalars: a model sums them over layers.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        lte = cfg.lte
        if cfg.hidden_dim % lte.expert_size:
            raise ConfigError(f"model.lte.expert_size={lte.expert_size} must divide model.hidden_dim={cfg.hidden_dim}")
        super().__init__(cfg, rngs=rngs)
        self.n_experts = cfg.hidden_dim // lte.expert_size
        self.expert_size = lte.expert_size
        self.mode, self.stage, self.tau, self.top_k = lte.mode, lte.stage, float(lte.tau), lte.top_k
        self.efficiency, self.sep_eps, self.execution = lte.efficiency, float(lte.sep_eps), lte.execution
        self.norm_eps = cfg.norm_eps
        self.expert_major = None  # ExpertMajor weights for execution=gather (with_execution)
        if self.top_k is not None and self.top_k > self.n_experts:
            raise ConfigError(f"model.lte.top_k={self.top_k} exceeds the {self.n_experts} experts")
        if lte.execution == "gather":
            _require_gather(cfg)
        r = cfg.init_std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (cfg.dim, self.n_experts),
                                                       _dtype(cfg.param_dtype))
        self.router = nnx.Param(r, logical_axes=("embed", None))

    # scores and selection
    def scores(self, x: jax.Array) -> jax.Array:
        """``σ(x · W_r)`` [..., E], float32."""
        return jax.nn.sigmoid(jnp.einsum("...d,de->...e", x.astype(jnp.float32), self.router[...].astype(jnp.float32)))

    def select(self, scores: jax.Array) -> jax.Array:
        """The experts that run (bool [..., E]): ``G > τ`` (LTE) or the ``top_k`` best scores (MoEfication)."""
        if self.mode == "moefication":
            _, idx = jax.lax.top_k(scores, self.top_k)
            return jnp.sum(jax.nn.one_hot(idx, self.n_experts, dtype=jnp.int32), axis=-2) > 0
        return scores > self.tau

    def expert_hidden(self, x: jax.Array) -> jax.Array:
        """Ungated ``up(x) ⊙ act(gate(x))`` [..., hidden] (every expert)."""
        return self.hidden(x)[1]

    def __call__(self, x, stats: dict | None):
        s = self.scores(x)
        sel = self.select(s)
        if self.execution == "gather":
            return self._gather(x, s, sel, stats)
        if self.mode == "lte" and self.stage == 1:
            weight = s  # soft: Σ G_i E_i(x)
        else:
            weight = jax.lax.stop_gradient(sel.astype(jnp.float32))
        xs, h = self.hidden(x)
        out = self.output(xs, constrain(self._gate(h, weight), ("batch", "length", "act_mlp")), stats)
        if stats is not None:
            self._stats(stats, s, sel)
        return out

    def _gate(self, h, weight):
        lead = h.shape[:-1]
        h = h.reshape(*lead, self.n_experts, self.expert_size) * weight[..., None].astype(h.dtype)
        return h.reshape(*lead, self.n_experts * self.expert_size)

    def _stats(self, stats, s, sel):
        add = lambda k, v: stats.__setitem__(k, stats.get(k, 0.0) + v)
        add("lte_eff", jnp.sum(efficiency_loss(s, self.efficiency)))
        add("lte_sep", jnp.sum(separability_loss(s, self.tau, self.sep_eps)))
        add("lte_active", jnp.sum(sel, dtype=jnp.float32))
        add("lte_tokens", jnp.asarray(math.prod(s.shape[:-1]), jnp.float32))
        counts = score_histogram(s)
        for i in range(HIST_BINS):
            add(f"lte_hist_{i:02d}", counts[i])

    def _gather(self, x, s, sel, stats):
        """Only the experts some token selected (choice 8): a loop over the union's experts, each reading
        its contiguous expert-major gate and up blocks [d, s] and down block [s, d_out]; every token keeps
        only its own experts. The loop runs ``n_union`` times (a dynamic trip count)."""
        lead, d = x.shape[:-1], x.shape[-1]
        E, es = self.n_experts, self.expert_size
        xt = x.reshape(-1, d)
        selt = sel.reshape(-1, E)
        n_tok = xt.shape[0]
        union = jnp.any(selt, axis=0)
        n_union = jnp.sum(union, dtype=jnp.int32)
        order = jnp.argsort(jnp.logical_not(union), stable=True).astype(jnp.int32)  # the union's experts first
        xs = self.w_gate.sparsify(xt)
        wgu = self.expert_major.get_value() if self.expert_major is not None else expert_major_weights(self)
        wd = self.w_down.effective_weight().reshape(E, es, -1)
        nw = None if self.subln is None else self.subln.weight[...].reshape(E, es).astype(jnp.float32)
        dt = self.w_down.dtype

        def body(i, carry):
            acc, ss, zeros = carry
            e = order[i]
            h = (xs @ wgu[1, e]) * glu_activation(xs @ wgu[0, e], self.activation)  # [T, s]
            h = h * selt[:, e][:, None].astype(h.dtype)
            if stats is not None:  # decode asks for no stats: no extra reduction per expert
                zeros = zeros + jnp.sum(h == 0, dtype=jnp.float32)
            if nw is not None:  # SubLN: RMS over the whole hidden vector (skipped neurons are zeros)
                ss = ss + jnp.sum(jnp.square(h.astype(jnp.float32)), axis=-1)
                h = (h.astype(jnp.float32) * nw[e]).astype(h.dtype)
            return acc + (h.astype(dt) @ wd[e]).astype(jnp.float32), ss, zeros

        init = (jnp.zeros((n_tok, wd.shape[-1]), jnp.float32), jnp.zeros((n_tok,), jnp.float32), jnp.zeros((), jnp.float32))
        out, ss, zeros = jax.lax.fori_loop(0, n_union, body, init)
        if nw is not None:
            out = out * jax.lax.rsqrt(ss / (E * es) + self.norm_eps)[:, None]
        if stats is not None:
            stats["gate_up"] = stats.get("gate_up", 0.0) + self.w_gate.zeros(xs)
            stats["down"] = stats.get("down", 0.0) + zeros + ((E - n_union) * es * n_tok).astype(jnp.float32)
            stats["lte_union"] = stats.get("lte_union", 0.0) + n_union.astype(jnp.float32)
            self._stats(stats, s, sel)
        return out.reshape(*lead, -1).astype(dt)


class ExpertMajor(nnx.Variable):
    """Inference-only copy of an LTE FFN's gate/up weights, expert-major ``[2, E, dim, s]`` (gate, up):
    each expert's block is contiguous, so decoding reads only the selected experts' bytes
    (:func:`with_execution` makes it; not a trainable ``Param``)."""


def expert_major_weights(ffn) -> jax.Array:
    """``[2, E, dim, s]``: each expert's gate and up columns, contiguous (effective, i.e. quantized, weights)."""
    d = ffn.w_gate.weight.shape[-2]
    E, es = ffn.n_experts, ffn.expert_size
    g = ffn.w_gate.effective_weight().reshape(d, E, es)
    u = ffn.w_up.effective_weight().reshape(d, E, es)
    return jnp.stack([g, u]).transpose(0, 2, 1, 3)


def _require_gather(cfg: ModelConfig):
    ok = (cfg.kernels == "off" and not cfg.input_norm and cfg.act_bits is None and cfg.keep("down") is None
          and not cfg.weight_sparsity.slorb)
    if not ok:
        raise ConfigError("model.lte.execution=gather needs kernels off, input_norm off, act_bits null, no top-K at the "
                          "down input (sparsity.down 0) and no SLoRB (they see the whole hidden vector); use "
                          "execution=masked")


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


# --- accounting -------------------------------------------------------------------------------------

def ffn_flops_per_token(cfg: ModelConfig, active_experts: float | None = None, sparsity: dict | None = None) -> float:
    """Forward FFN FLOPs per token, all layers (``2·`` multiply-adds). Dense: ``6·dim·hidden·L``. With
    ``active_experts`` (mean selected experts per token per layer): that fraction of gate/up/down plus the
    router (``2·dim·E``). With Q-Sparse ``sparsity`` ({gate_up, down}): kept inputs only."""
    d, h, L = cfg.dim, cfg.hidden_dim, cfg.n_layers
    if active_experts is not None:
        E = h // cfg.lte.expert_size
        return L * (6 * d * active_experts * cfg.lte.expert_size + 2 * d * E)
    if sparsity is not None:
        return L * (4 * d * h * (1 - sparsity.get("gate_up", 0.0)) + 2 * h * d * (1 - sparsity.get("down", 0.0)))
    return 6.0 * d * h * L


def lte_summary(cfg: ModelConfig, stats: dict) -> tuple[dict, dict]:
    """(summary, histogram) from ``stats`` (the model's ``return_stats`` dict, summed over layers): FFN
    sparsity, active experts, FLOPs/token, mean losses; the router-score histogram as fractions per bin.
    The per-layer vector ``stats["by_layer"]["lte_active"]`` [L] also gives ``ffn_sparsity_layer{l}``."""
    E = cfg.hidden_dim // cfg.lte.expert_size
    L = cfg.n_layers
    active = np.asarray(stats.get("by_layer", stats)["lte_active"], np.float64)
    tok = np.asarray(stats["lte_tokens"], np.float64)
    tok_per_layer = float(np.sum(tok)) / L  # tokens seen by one layer
    mean_active = float(np.sum(active)) / (tok_per_layer * L)
    out = {"ffn_sparsity": 1.0 - mean_active / E, "active_experts": mean_active,
           "ffn_flops_per_token": ffn_flops_per_token(cfg, mean_active), "dense_ffn_flops_per_token":
           ffn_flops_per_token(cfg), "efficiency_loss": float(np.sum(stats["lte_eff"])) / (tok_per_layer * L),
           "separability_loss": float(np.sum(stats["lte_sep"])) / (tok_per_layer * L)}
    if active.ndim == 1 and active.size == L:
        for l in range(L):
            out[f"ffn_sparsity_layer{l}"] = 1.0 - float(active[l]) / (tok_per_layer * E)
    if "lte_union" in stats:
        out["union_experts"] = float(np.sum(stats["lte_union"])) / L
    hist = np.array([float(np.sum(stats[f"lte_hist_{i:02d}"])) for i in range(HIST_BINS)])
    hist = hist / max(hist.sum(), 1.0)
    tau = cfg.lte.tau
    out["scores_within_0.05_of_tau"] = float(sum(hist[i] for i in range(HIST_BINS)
                                                 if abs((i + 0.5) / HIST_BINS - tau) < 0.05 + 1e-9))
    return out, {f"{i / HIST_BINS:.2f}": float(hist[i]) for i in range(HIST_BINS)}


# --- the trainer's method --------------------------------------------------------------------------

from .methods import TrainingMethod, key_path  # noqa: E402  (methods imports nothing of lte at import time)


class LTEMethod(TrainingMethod):
    """LTE in the trainer: stage 1 adds ``η · L_eff + λ_sep · L_sep`` (sums over the batch's tokens,
    each layer's term averaged over layers); stage 2 and MoEfication freeze every router (no gradient,
    no update: bit-identical); at log steps, FFN sparsity (overall and per layer when the stats hold
    per-layer vectors), FFN FLOPs per token and the router-score histogram."""

    name = "lte"
    needs_stats = True
    # routers are not added at --init_from (they need the neurons grouped and permuted first)
    init_from_hint = "make an LTE checkpoint from a dense one with python -m qsparse_jax.lte convert"

    def __init__(self, cfg):
        self.model_cfg = cfg.model
        self.lte = cfg.model.lte
        self.n_layers = cfg.model.n_layers

    def loss_terms(self, ctx, consts):
        lte = self.lte
        if lte.mode != "lte" or lte.stage != 1:
            return {}
        st, terms = ctx.stats, {}
        if lte.eta > 0:
            terms["lte_efficiency"] = lte.eta * jnp.sum(st["lte_eff"]) / self.n_layers
        if lte.separability > 0:
            terms["lte_separability"] = lte.separability * jnp.sum(st["lte_sep"]) / self.n_layers
        return terms

    def frozen(self, trainable):
        if self.lte.mode == "lte" and self.lte.stage == 1:
            return None
        return jax.tree_util.tree_map_with_path(lambda p, _: "router" in key_path(p), trainable)

    def log_metrics(self, params, stats, n_tokens):
        if not stats or "lte_active" not in stats:
            return {}
        summary, hist = lte_summary(self.model_cfg, stats)
        return {"lte": summary, "lte_hist": hist}


def dense_variant(model):
    """The same weights as a plain dense-FFN ``Transformer`` (routers dropped): the dense baseline of
    an LTE model (e.g. ``generate``'s tokens/s comparison)."""
    from .model import Transformer

    cfg = model.config.replace(lte=LTEConfig())
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    target = nnx.to_pure_dict(state)
    _copy_into(target, nnx.to_pure_dict(nnx.state(model)), skip=("router",))
    nnx.replace_by_pure_dict(state, target)
    return nnx.merge(graphdef, state)


def with_execution(model, execution: str = "gather"):
    """The LTE model with ``model.lte.execution`` changed (same weights)."""
    import dataclasses

    from .model import with_config

    m = with_config(model, lte=dataclasses.replace(model.config.lte, execution=execution))
    if execution == "gather":
        for _, mod in nnx.iter_modules(m):
            if isinstance(mod, LTEFeedForward):
                w = (jax.vmap(lambda st: expert_major_weights(nnx.merge(nnx.graphdef(mod), st)))(nnx.state(mod))
                     if m.config.scan_layers else expert_major_weights(mod))
                mod.expert_major = nnx.data(ExpertMajor(w))
    return m


def decode_union(model, tokens) -> dict:
    """For tokens [B, T] (e.g. a decoded batch): the mean selected experts per token and the mean union
    of the B rows' experts at each position (what one batched decode step reads), per layer and mean."""
    per_tok, union = [], []
    for block, (xin, _) in zip(_blocks(model), walk(model, jnp.asarray(tokens))):
        sel = block.mlp.select(block.mlp.scores(xin))  # [B, T, E]
        per_tok.append(float(jnp.mean(jnp.sum(sel, -1))))
        union.append(float(jnp.mean(jnp.sum(jnp.any(sel, axis=0), -1))))
    E = model.config.hidden_dim // model.config.lte.expert_size
    return {"experts": E, "selected_per_token": float(np.mean(per_tok)), "union_per_step": float(np.mean(union)),
            "selected_per_token_layers": per_tok, "union_per_step_layers": union}


# --- walking the layers (calibration, per-layer numbers) --------------------------------------------

def _blocks(model):
    if model.config.scan_layers:
        graphdef, state = nnx.split(model.layers)
        return [nnx.merge(graphdef, jax.tree.map(lambda a: a[l], state)) for l in range(model.config.n_layers)]
    return list(model.layers)


def walk(model, tokens, *, dense: bool = False):
    """Per layer, the FFN input ``x`` (after ``mlp_norm``), and the layer's stats (``stats`` dict of the
    layer alone). ``dense``: every FFN runs all its neurons (the dense model, for MoEfication labels)."""
    x = jnp.take(model.embed[...], tokens, axis=0).astype(_dtype(model.config.dtype))
    out = []
    for block in _blocks(model):
        x = x + block.attn(block.attn_norm(x), None, None, None)
        xin = block.mlp_norm(x)
        st: dict = {}
        if dense:
            h = block.mlp.expert_hidden(xin) if isinstance(block.mlp, LTEFeedForward) else None
            if h is None:
                y = block.mlp(xin, st)
            else:
                if block.mlp.subln is not None:
                    h = block.mlp.subln(h)
                y = block.mlp.w_down(h)
        else:
            y = block.mlp(xin, st)
        out.append((xin, st))
        x = x + y
    return out


def layer_sparsity(model, tokens) -> list[float]:
    """Measured FFN sparsity (fraction of neurons skipped per token) of each layer."""
    res = []
    for _, st in walk(model, tokens):
        E = model.config.hidden_dim // model.config.lte.expert_size
        res.append(1.0 - float(st["lte_active"]) / (float(st["lte_tokens"]) * E))
    return res


def token_sparsity(model, tokens) -> np.ndarray:
    """[layers, tokens]: the fraction of experts skipped by each token in each layer."""
    rows = []
    for block, (xin, _) in zip(_blocks(model), walk(model, tokens)):
        sel = block.mlp.select(block.mlp.scores(xin))
        rows.append(1.0 - np.asarray(jnp.mean(sel.astype(jnp.float32), axis=-1)).reshape(-1))
    return np.stack(rows)


# --- MoEfication baseline ---------------------------------------------------------------------------

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


def fit_moefication_routers(model, batches, *, top_k: int | None = None, steps: int = 300, lr: float = 1e-2):
    """Fit every layer's router to a dense model's expert activity (choice 9) on ``batches`` (a list of
    token arrays [b, s]); returns ``(model, accuracies)`` — the model in place with routers set, and per
    layer the fraction of the fitted top-k that matches the label top-k on the calibration tokens."""
    cfg = model.config
    k = top_k or cfg.lte.top_k
    if k is None:
        raise ConfigError("MoEfication needs top_k (experts kept per token)")
    per_layer_x, per_layer_h = [[] for _ in range(cfg.n_layers)], [[] for _ in range(cfg.n_layers)]
    for tokens in batches:
        for l, (block, (xin, _)) in enumerate(zip(_blocks(model), walk(model, jnp.asarray(tokens), dense=True))):
            per_layer_x[l].append(xin.reshape(-1, cfg.dim))
            per_layer_h[l].append(block.mlp.expert_hidden(xin).reshape(-1, cfg.hidden_dim))
    routers, acc = [], []
    for l, block in enumerate(_blocks(model)):
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


# --- from a dense model -----------------------------------------------------------------------------

def to_lte(model, lte: LTEConfig, *, seed: int = 0, iters: int = 25):
    """A dense ``Transformer`` → the LTE model of the same weights: each layer's neurons grouped
    (:func:`group_experts`), permuted contiguous, routers added (random, choice 5). Returns
    ``(lte_model, perms)``."""
    from .model import Transformer

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
             for l, f in enumerate(ffns)]
    pure = permute_model_params(pure, perms, cfg.scan_layers)
    fresh = Transformer(new_cfg, rngs=nnx.Rngs(seed))  # routers from here; everything else overwritten
    graphdef, state = nnx.split(fresh)
    target = nnx.to_pure_dict(state)
    _copy_into(target, pure)
    nnx.replace_by_pure_dict(state, target)
    return nnx.merge(graphdef, state), perms


def _copy_into(dst: dict, src: dict, skip: tuple = ()):
    for k, v in src.items():
        if k in skip:
            continue
        if isinstance(v, dict):
            _copy_into(dst[k], v, skip)
        else:
            dst[k] = v


def write_checkpoint(model, cfg, workdir: str | Path) -> Path:
    """``WORKDIR/checkpoints/0`` (parameters) + ``WORKDIR/config.yaml``, for ``train.py --init_from``."""
    from .convert import write_model_checkpoint

    return write_model_checkpoint(model, cfg, workdir)


def load_dense(ckpt: str | None = None, hf: str | None = None):
    """(model, Config) of a training checkpoint or an HF directory."""
    import dataclasses

    from .config import Config, DataConfig

    if (ckpt is None) == (hf is None):
        raise ConfigError("give exactly one of --ckpt DIR or --hf DIR")
    if ckpt is not None:
        from .convert import load_checkpoint_model

        cfg, params, graphdef = load_checkpoint_model(ckpt)
        return nnx.merge(graphdef, params), cfg
    from .hf import load_pretrained

    model = load_pretrained(hf)
    data = DataConfig(seq_len=min(DataConfig.seq_len, model.config.max_seq_len))
    if (Path(hf) / "tokenizer.json").is_file():
        data = dataclasses.replace(data, tokenizer=str((Path(hf) / "tokenizer.json").absolute()))
    return model, Config(model=model.config, data=data)


def convert(workdir: str, *, ckpt: str | None = None, hf: str | None = None, lte: LTEConfig | None = None,
            seed: int = 0, calib_batches: int = 8, fit_steps: int = 300) -> dict:
    """Dense checkpoint / HF model → grouped LTE checkpoint in ``workdir`` (MoEfication: routers fit on
    ``calib_batches`` training batches). Returns a summary."""
    import dataclasses

    model, cfg = load_dense(ckpt, hf)
    lte = lte or LTEConfig(enabled=True)
    if cfg.model.lte.enabled:
        raise ConfigError("the source model already has LTE routers; convert a dense model")
    lte_model, _ = to_lte(model, lte, seed=seed)
    summary = {"experts": lte_model.config.hidden_dim // lte.expert_size, "expert_size": lte.expert_size}
    if lte.mode == "moefication":
        from .data import load_splits, train_dataset

        it = iter(train_dataset(load_splits(cfg.data).train, cfg.data))
        batches = [np.asarray(next(it))[:, :-1] for _ in range(calib_batches)]
        lte_model, acc = fit_moefication_routers(lte_model, batches, steps=fit_steps)
        summary["router_topk_recall"] = acc
    new = dataclasses.replace(cfg, model=lte_model.config)
    write_checkpoint(lte_model, new, workdir)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsparse_jax.lte", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="dense checkpoint / HF model -> LTE checkpoint (grouped, permuted, routers)")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt")
    src.add_argument("--hf")
    c.add_argument("workdir")
    c.add_argument("--expert-size", "--expert_size", type=int, default=32)
    c.add_argument("--mode", choices=("lte", "moefication"), default="lte")
    c.add_argument("--top-k", "--top_k", type=int, default=None, help="moefication: experts kept per token")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--calib-batches", "--calib_batches", type=int, default=8)
    args = p.parse_args(argv)
    try:
        lte = LTEConfig(enabled=True, expert_size=args.expert_size, mode=args.mode, top_k=args.top_k)
        summary = convert(args.workdir, ckpt=args.ckpt, hf=args.hf, lte=lte, seed=args.seed,
                          calib_batches=args.calib_batches)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {Path(args.workdir) / 'checkpoints'}: {summary}")
    print(f"train it: python train.py --config {Path(args.workdir) / 'config.yaml'} --init_from "
          f"{Path(args.workdir) / 'checkpoints'} --workdir RUN model.lte.eta=...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
