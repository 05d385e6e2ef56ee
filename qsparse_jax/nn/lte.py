"""The LTE feed-forward layer: experts with a sigmoid router, soft (stage 1) or hard (stage 2), masked or gathered.

LTE: Learn-To-be-Efficient (arXiv 2402.06126, NeurIPS 2024; SEEDS §3) — learned structured activation
sparsity: the FFN's neurons grouped into experts, a sigmoid router per FFN, experts skipped at inference.
This module holds the layer (:class:`LTEFeedForward`), its expert-major inference weights, its statistics
and a block-by-block walk of a model; the pieces of the method live beside the layer they belong to:

- the math (clustering, losses, router fitting): ``ops/experts.py``;
- dense → LTE conversion and MoEfication routers: ``transforms/lte_convert.py`` (``qsparse lte convert``);
- the trainer hooks: ``train/methods/lte.py``; inference variants: ``infer/variants.py``;
  per-layer / per-token probes: ``analysis/lte_probes.py``.

What they do:

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
  union of the tokens' experts (reported as ``lte_union``), either every token multiplied and masked to its
  own experts (the loop) or only the (token, expert) pairs, as a grouped matmul (choice 8).
- **MoEfication baseline** (:func:`fit_moefication_routers`): routers fit to a *dense* model (not trained
  with it) to predict which experts are active; the ``top_k`` best-scored experts are kept per token.
- **From a dense model** (:func:`to_lte`, ``qsparse lte convert``): a dense checkpoint or HF
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
8. *Execution* (gather), three ways (``GATHER_IMPLS``), picked by :func:`gather_impl` from the token count
   and the platform (or forced by ``LTEFeedForward.gather_impl``); training uses none of them (``execution:
   masked``: stage 1 needs every expert's output, stage 2 the masked path's gradients):
   - *loop*: a ``fori_loop`` (dynamic trip count) over the union of the batch's selected experts, each
     iteration one expert's contiguous blocks times every token, masked to the tokens that selected it; at
     batch 1 the union is the token's selection. Used below ``GROUPED_FROM`` = 8 tokens (decode at batch 1).
   - *grouped* (``ops.experts.grouped_ffn``, as MoE layers run experts): the (token, expert) pairs sorted by
     expert in a static T·E rows, group sizes per expert, results added back per token, so only each token's
     own experts are multiplied. ``ragged``: two ``jax.lax.ragged_dot`` (TPU / GPU, from 8 tokens); ``tiles``:
     a loop over tiles of rows of one expert each (XLA:CPU, from 8 tokens; there ``ragged_dot`` expands to a
     dense product per group, 4–19× slower than the dense FFN).
   The gate/up weights are kept a second time expert-major ``[2, E, dim, s]`` for inference
   (:class:`ExpertMajor`, made by :func:`with_execution`; a deployment would store only that layout),
   because gathering the selected columns of ``[dim, hidden]`` (or blocks of ``[E, dim, s]``) on XLA:CPU
   costs 2.7–16× the dense FFN. On a loaded 2-core CPU at 50 % FFN sparsity (benchmarks/RESULTS.md, "LTE at
   batch > 1", 8–64 tokens) the tile loop takes 0.51–1.35× the dense FFN's time (median 0.79; the loop
   0.52–1.59×, median 0.82; tiles ahead at 64 tokens in 4 of 5 cells), a noisy machine; on an idle one
   the loop was no faster than dense at batch 1 (0.9× of dense's speed at dim 1024 / hidden 2816, 0.5× at
   2048 / 5632 and 4096 / 11008): the dense matmul uses every core, the loops one, and XLA copies
   each dynamic slice before its dot. On TPU (compile-only) every form is estimated slower than dense, and at
   batch ≥ 8 the union is every expert, so no form can read fewer bytes than the dense FFN. The paper's 25 %
   latency cut needs a kernel that reads the selected blocks in place (its Triton kernel); none is here.
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

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import ModelConfig
from ..errors import ConfigError
from ..ops.experts import HIST_BINS, efficiency_loss, grouped_ffn, score_histogram, separability_loss
from .layers import FeedForward, _dtype, glu_activation
from .sharding import constrain, target_platform

GATHER_IMPLS = ("loop", "tiles", "ragged")  # execution=gather's ways to run the selected experts (choice 8)
GROUPED_FROM = 8  # tokens from which the grouped forms beat the loop over the union (benchmarks/lte_grouped.py)


def gather_impl(n_tokens: int, platform: str) -> tuple[str, int | None]:
    """How ``execution: gather`` runs ``n_tokens`` tokens' experts on ``platform``: ``(impl, tile)`` (choice 8).
    Below ``GROUPED_FROM`` tokens the loop over the union; from it a grouped matmul of the (token, expert)
    pairs: ``ragged_dot`` on TPU / GPU (a native kernel there), the tile loop on CPU (``ragged_dot`` is
    E times the dense FLOPs on XLA:CPU), tiles of ``n_tokens // 4`` rows, at least 8."""
    if n_tokens < GROUPED_FROM:
        return "loop", None
    if platform in ("tpu", "gpu", "cuda", "rocm"):
        return "ragged", None
    return "tiles", tile_rows(n_tokens)


def tile_rows(n_tokens: int) -> int:
    """Rows per tile of the tile loop: a quarter of the tokens, at least 8 (at most the tokens)."""
    return min(n_tokens, max(8, n_tokens // 4))


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
        self.gather_impl: str | None = None  # one of GATHER_IMPLS; None: gather_impl() picks by tokens, platform
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
        """Only the experts some token selected (choice 8), every token reading only its own: the loop over
        the union's experts, or a grouped matmul of the (token, expert) pairs (``ops.experts.grouped_ffn``)."""
        lead, d = x.shape[:-1], x.shape[-1]
        E, es = self.n_experts, self.expert_size
        xt = x.reshape(-1, d)
        selt = sel.reshape(-1, E)
        n_tok = xt.shape[0]
        n_union = jnp.sum(jnp.any(selt, axis=0), dtype=jnp.int32)
        xs = self.w_gate.sparsify(xt)
        wgu = self.expert_major.get_value() if self.expert_major is not None else expert_major_weights(self)
        wd = self.w_down.effective_weight().reshape(E, es, -1)
        nw = None if self.subln is None else self.subln.weight[...].reshape(E, es).astype(jnp.float32)
        if self.gather_impl is None:
            impl, tile = gather_impl(n_tok, target_platform())
        elif self.gather_impl in GATHER_IMPLS:
            impl, tile = self.gather_impl, (tile_rows(n_tok) if self.gather_impl == "tiles" else None)
        else:
            raise ConfigError(f"LTEFeedForward.gather_impl must be one of {GATHER_IMPLS}, got {self.gather_impl!r}")
        if impl == "loop":
            out, ss, zeros = self._union_loop(xs, selt, n_union, wgu, wd, nw, stats is not None)
        else:
            act = lambda g: glu_activation(g, self.activation)
            out, ss, zeros = grouped_ffn(xs, selt, wgu, wd, act, tile=tile, norm_weight=nw,
                                         count_zeros=stats is not None)
        if nw is not None:  # SubLN: RMS over the whole hidden vector (skipped neurons are zeros)
            out = out * jax.lax.rsqrt(ss / (E * es) + self.norm_eps)[:, None]
        if stats is not None:
            stats["gate_up"] = stats.get("gate_up", 0.0) + self.w_gate.zeros(xs)
            stats["down"] = stats.get("down", 0.0) + zeros
            stats["lte_union"] = stats.get("lte_union", 0.0) + n_union.astype(jnp.float32)
            self._stats(stats, s, sel)
        return out.reshape(*lead, -1).astype(self.w_down.dtype)

    def _union_loop(self, xs, selt, n_union, wgu, wd, nw, count_zeros):
        """A loop over the union's experts (``n_union`` iterations, a dynamic trip count), each reading its
        contiguous expert-major gate and up blocks [d, s] and down block [s, d_out] and multiplying every
        token, masked to the tokens that selected it. ``(out f32, Σh² per token, zeros of the down input)``."""
        E, es = self.n_experts, self.expert_size
        n_tok = xs.shape[0]
        order = jnp.argsort(jnp.logical_not(jnp.any(selt, axis=0)), stable=True).astype(jnp.int32)  # union first
        dt = self.w_down.dtype

        def body(i, carry):
            acc, ss, zeros = carry
            e = order[i]
            h = (xs @ wgu[1, e]) * glu_activation(xs @ wgu[0, e], self.activation)  # [T, s]
            h = h * selt[:, e][:, None].astype(h.dtype)
            if count_zeros:  # decode asks for no stats: no extra reduction per expert
                zeros = zeros + jnp.sum(h == 0, dtype=jnp.float32)
            if nw is not None:
                ss = ss + jnp.sum(jnp.square(h.astype(jnp.float32)), axis=-1)
                h = (h.astype(jnp.float32) * nw[e]).astype(h.dtype)
            return acc + (h.astype(dt) @ wd[e]).astype(jnp.float32), ss, zeros

        init = (jnp.zeros((n_tok, wd.shape[-1]), jnp.float32), jnp.zeros((n_tok,), jnp.float32), jnp.zeros((), jnp.float32))
        out, ss, zeros = jax.lax.fori_loop(0, n_union, body, init)
        return out, ss, zeros + ((E - n_union) * es * n_tok).astype(jnp.float32)


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


def _copy_into(dst: dict, src: dict, skip: tuple = ()):
    for k, v in src.items():
        if k in skip:
            continue
        if isinstance(v, dict):
            _copy_into(dst[k], v, skip)
        else:
            dst[k] = v
