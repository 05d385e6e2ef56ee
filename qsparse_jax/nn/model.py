"""The Llama-style decoder: blocks, the model, its pure-functional form, and Q-Sparse parameter accounting.

A :class:`Block` picks its feed-forward from the config (``FeedForward``, or ``nn/lte.py``'s
``LTEFeedForward`` when ``model.lte.enabled``). :func:`functional` gives ``apply(params, tokens)`` on a plain
pytree (``nnx.split`` / ``merge``); :func:`activated_params` / :func:`sparsity_from_zeros` are the one
accounting of activated parameters ``N_a`` that FLOPs, MFU and the scaling law read.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import PROJECTION_GROUPS, ModelConfig
from ..ops.nm import slorb_model_params
from .layers import Attention, FeedForward, RMSNorm, _dtype
from .lte import LTEFeedForward
from .selection import TOPK_NAME
from .sharding import constrain


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = _dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=pdt)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=pdt)
        if cfg.lte.enabled:  # LTE experts + router (lte.py imports this module: import here)

            self.mlp = LTEFeedForward(cfg, rngs=rngs)
        else:
            self.mlp = FeedForward(cfg, rngs=rngs)

    def __call__(self, x, positions, segment_ids, stats: dict | None = None, cache: dict | None = None):
        if cache is None:
            x = x + self.attn(self.attn_norm(x), positions, segment_ids, stats)
            return x + self.mlp(self.mlp_norm(x), stats)
        h, cache = self.attn(self.attn_norm(x), positions, segment_ids, stats, cache)
        x = x + h
        return x + self.mlp(self.mlp_norm(x), stats), cache


ACT = ("batch", "length", "act_embed")  # the residual stream's logical axes


class Transformer(nnx.Module):
    """``Transformer(config, rngs=nnx.Rngs(seed))(tokens) -> logits`` ([batch, seq] → [batch, seq, vocab]).

    The LM head stays dense and full precision (BitNet); it is the transposed embedding when
    ``tie_embeddings``.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        pdt = _dtype(config.param_dtype)
        emb = config.init_std * jax.random.normal(rngs.params(), (config.vocab_size, config.dim), pdt)
        self.embed = nnx.Param(emb, logical_axes=("vocab", "embed"))
        if config.scan_layers:  # one Block whose parameters carry a leading layer axis
            @nnx.split_rngs(splits=config.n_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(rngs):
                return Block(config, rngs=rngs)

            self.layers = stacked(rngs)
        else:
            self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layers)])
        self.norm = RMSNorm(config.dim, config.norm_eps, param_dtype=pdt)
        if config.tie_embeddings:
            self.lm_head = None
        else:
            head = config.init_std * jax.random.normal(rngs.params(), (config.dim, config.vocab_size), pdt)
            self.lm_head = nnx.Param(head, logical_axes=("embed", "vocab"))

    def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, return_stats: bool = False, cache: list | None = None,
                 return_hidden: bool = False):
        """tokens, positions, segment_ids: int [batch, seq]. With ``return_stats`` also returns the
        number of zeros seen at each projection group's matmul input (and the layers' other statistics,
        e.g. LTE's), summed over layers, with each key's [n_layers] vector under ``stats["by_layer"]``. With a KV
        ``cache`` (:func:`init_cache`) the tokens continue the cached ones: returns ``(logits, cache)``. With
        ``return_hidden`` (and ``return_stats``) ``stats["by_layer"]["hidden"]`` is the residual stream after each
        block, [n_layers, batch, seq, dim] (layer-wise distillation)."""
        cfg = self.config
        if positions is None and cache is not None:  # without a cache, attention takes 0..s-1 itself
            start = cache["index"][0] if cfg.scan_layers else cache[0]["index"]
            positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        x = constrain(jnp.take(self.embed[...], tokens, axis=0).astype(_dtype(cfg.dtype)), ACT)
        run = _remat_block(cfg.remat, return_stats) if cfg.remat != "none" and cache is None else None
        if cfg.scan_layers:
            x, stats, new_cache = _scan_blocks(self.layers, x, positions, segment_ids, return_stats, cache, run,
                                               return_hidden)
        else:
            new_cache, per_layer = [], []
            for i, layer in enumerate(self.layers):
                st = {} if return_stats else None
                if run is not None:
                    x, st = run(layer, x, positions, segment_ids)
                elif cache is None:
                    x = layer(x, positions, segment_ids, st)
                else:
                    x, c = layer(x, positions, segment_ids, st, cache[i])
                    new_cache.append(c)
                if return_hidden and st is not None:
                    st["hidden"] = x
                per_layer.append(st)
            stats = _layer_stats(jax.tree.map(lambda *v: jnp.stack(v), *per_layer)) if return_stats else None
        x = self.norm(constrain(x, ACT)).astype(jnp.float32)
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        logits = constrain(x @ head.astype(jnp.float32), ("batch", "length", "act_vocab"))
        out = (logits, stats) if return_stats else logits
        return out if cache is None else (out, new_cache)


REMAT_POLICIES = {
    # recompute everything in the backward pass: least memory
    "full": None,
    # keep matmul outputs without a batch dimension in the weights (MaxText's "minimal"-like policy)
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # ... and the top-K selections' outputs (the weight gradients' inputs): the backward pass does not
    # run the selection again, at the memory of one activation per sparsified input
    "dots_topk": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(TOPK_NAME)),
}


def _remat_block(policy: str, with_stats: bool = False):
    """``block(x, positions, segment_ids) -> (x, stats or None)`` under activation checkpointing
    (``jax.checkpoint``); the layer's statistics are outputs, so training methods that read them
    (LTE) keep remat."""
    def run(layer, x, positions, segment_ids):
        st = {} if with_stats else None
        return layer(x, positions, segment_ids, st), st

    return nnx.remat(run, policy=REMAT_POLICIES[policy])


def _layer_stats(stacked: dict) -> dict:
    """Per-layer statistics [n_layers] → their sums, and the vectors under ``by_layer`` (``hidden``: there only)."""
    return {**{k: jnp.sum(v) for k, v in stacked.items() if k != "hidden"}, "by_layer": stacked}


def _scan_blocks(blocks, x, positions, segment_ids, return_stats: bool, cache, run, return_hidden: bool = False):
    """The stacked Block applied layer after layer with ``lax.scan`` over its split state (one traced
    body, so compile time does not grow with depth): returns (x, stats (``_layer_stats``), new cache).
    A plain ``lax.scan`` over ``nnx.split`` state, not ``nnx.scan``, so the model can itself be called
    inside other JAX loops (the decode loop's scan) with closed-over parameters."""
    graphdef, state = nnx.split(blocks)

    def body(x, xs):
        layer_state, layer_cache = xs
        block = nnx.merge(graphdef, layer_state)
        st = {} if return_stats else None
        c = None
        if layer_cache is not None:
            x, c = block(x, positions, segment_ids, st, layer_cache)
        elif run is not None:
            x, st = run(block, x, positions, segment_ids)
        else:
            x = block(x, positions, segment_ids, st)
        if return_hidden and st is not None:
            st["hidden"] = x
        return constrain(x, ACT), (st, c)

    x, (stats, new_cache) = jax.lax.scan(body, x, (state, cache))
    return x, _layer_stats(stats) if return_stats else None, new_cache


def with_config(model: Transformer, **changes) -> Transformer:
    """The same weights under a changed config (sparsity, kernels, dtype: anything not shaping params)."""
    cfg = model.config.replace(**changes)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


def functional(model: nnx.Module) -> tuple[Callable[..., Any], nnx.State]:
    """Split a model into ``(apply, params)`` with ``apply(params, tokens, **kw) = model(tokens, **kw)``.

    ``params`` is the model's ``nnx.State`` (a pytree); a plain nested dict of arrays, as from
    ``nnx.to_pure_dict(params)``, is accepted too.
    """
    graphdef, state = nnx.split(model)

    def apply(params, tokens, **kw):
        if not isinstance(params, nnx.State):
            params = _from_pure_dict(state, params)
        return nnx.merge(graphdef, params)(tokens, **kw)

    apply.config = getattr(model, "config", None)
    return apply, state


def _from_pure_dict(template: nnx.State, pure) -> nnx.State:
    abstract = jax.tree.map(lambda x: x, template)  # a fresh State; the template is left untouched
    nnx.replace_by_pure_dict(abstract, pure)
    return abstract


def nll_sum(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(Σ weight · next-token NLL in nats, Σ weight), float32; weights default to 1. Sums, so batches
    and micro-batches combine exactly."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if weights is None:
        return jnp.sum(nll), jnp.asarray(nll.size, jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean next-token negative log-likelihood in nats (float32), weighted when ``weights`` are given."""
    total, n = nll_sum(logits, targets, weights)
    return total / jnp.maximum(n, 1.0)


def projection_params(config: ModelConfig) -> dict[str, int]:
    """Weights per projection group, summed over layers (gate and up listed separately)."""
    c = config
    q_out, kv_out = c.n_heads * c.head_size, c.kv_heads * c.head_size
    per_layer = {"qkv": c.dim * (q_out + 2 * kv_out), "out": q_out * c.dim,
                 "gate": c.dim * c.hidden_dim, "up": c.dim * c.hidden_dim, "down": c.hidden_dim * c.dim}
    return {k: v * c.n_layers for k, v in per_layer.items()}


def activated_params(config: ModelConfig, sparsity: dict[str, float]) -> dict[str, float]:
    """Overall sparsity and activated parameters per token from per-projection sparsities.

    ``overall`` is the parameter-weighted sparsity over the block projections and ``N_a`` the block
    projection weights a token touches, ``Σ (1 − S_p)·|W_p|``. With Mistral-7B shapes and the paper's
    QKV 42.0 / Out 40.0 / Up 40.0 / Gate 40.0 / Down 60.4 this gives overall 45.7 % and N_a 3.8B, as
    the paper reports. ``N_total`` counts every parameter, ``N_head`` the dense LM head. With AST N:M weights
    (``model.weight_sparsity``) ``N_a`` counts the kept ``N/M`` of the weights plus the SLoRB parameters
    (``N_slorb``, also in ``N_total``).
    """
    params = projection_params(config)
    n_proj = sum(params.values())
    n_a = sum((1.0 - sparsity[g]) * n for g, n in params.items())
    n_head = config.dim * config.vocab_size
    n_embed = 0 if config.tie_embeddings else n_head
    out = {"overall": 1.0 - n_a / n_proj, "N_a": n_a, "N_proj": float(n_proj), "N_head": float(n_head),
           "N_total": float(n_proj + n_head + n_embed + config.dim * (2 * config.n_layers + 1))}
    ws = config.weight_sparsity
    if ws.enabled:  # AST: a token meets only the N of every M weights, plus every SLoRB parameter

        n_slorb = float(slorb_model_params(config, ws.slorb_group, ws.slorb_train_x)) if ws.slorb else 0.0
        out.update(N_a=n_a * ws.n / ws.m + n_slorb, N_slorb=n_slorb, N_total=out["N_total"] + n_slorb,
                   weight_density=ws.n / ws.m)
    return out


def measure_sparsity(model_or_apply, params_or_tokens, tokens=None, **kw) -> dict[str, float]:
    """Run one batch and return the measured sparsity at each projection input (QKV, Out, Up, Gate,
    Down), the parameter-weighted ``overall`` sparsity and ``N_a`` (Q-Sparse Table 2).

    Call as ``measure_sparsity(model, tokens)`` or ``measure_sparsity(apply, params, tokens)``.
    Sparsity is the fraction of exact zeros in the tensor each matmul consumes, so it includes the
    zeros ReLU² and int8 rounding make, not only those top-K makes.
    """
    if tokens is None:
        (apply, params), tokens = functional(model_or_apply), params_or_tokens
    else:
        apply, params = model_or_apply, params_or_tokens
    config = apply.config
    _, zeros = jax.jit(lambda p, t: apply(p, t, return_stats=True, **kw))(params, tokens)
    per_proj = sparsity_from_zeros(config, zeros, tokens.size)
    return {**per_proj, **activated_params(config, per_proj)}


def sparsity_from_zeros(config: ModelConfig, zeros: dict, n_tokens: int) -> dict[str, float]:
    """Per-projection sparsity (QKV, Out, Up, Gate, Down) from the zero counts the model returns with
    ``return_stats=True`` for ``n_tokens`` tokens; gate and up share their input."""
    dims = config.group_input_dims()
    s = {g: float(zeros[g]) / (n_tokens * config.n_layers * dims[g]) for g in PROJECTION_GROUPS}
    return {"qkv": s["qkv"], "out": s["out"], "up": s["gate_up"], "gate": s["gate_up"], "down": s["down"]}

