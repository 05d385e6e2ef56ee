"""Transformer building blocks (Flax NNX): RMSNorm, RoPE, SparseLinear, attention, GLU feed-forward.

Every parameter carries ``logical_axes`` metadata (embed, heads, kv, mlp, vocab); ``sharding.py`` maps
those names onto mesh axes, so no layer mentions a mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .config import ModelConfig
from .quant import quantize_activations, quantize_weights
from .sparsity import topk_sparsify


def _dtype(name: str):
    return jnp.dtype(name)


def rms_norm(x: jax.Array, eps: float, weight: jax.Array | None = None) -> jax.Array:
    """``x / sqrt(mean(x²) + eps) · weight``, computed in float32 (as HF Llama)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("embed",))

    def __call__(self, x):
        return rms_norm(x, self.eps, self.weight[...])


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, HF half-split layout: ``x·cos + rotate_half(x)·sin``.

    x: [batch, seq, heads, head_dim]; positions: [batch, seq] (int).
    """
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, s, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class SparseLinear(nnx.Module):
    """``y = Q_w(W)ᵀ · Q(Top_k(norm(x)))`` — every piece optional (Q-Sparse Eq. 2, 4, 8).

    ``sparsify`` is the parameter-free input path (RMSNorm → top-K → int8 fake-quant); ``project`` is
    the matmul with (optionally ternary / 1-bit) weights. Projections that share an input (q/k/v,
    gate/up) call ``sparsify`` once and ``project`` each. The weight is stored [in, out].
    """

    def __init__(self, in_features: int, out_features: int, *, keep: int | None, cfg: ModelConfig,
                 axes: tuple[str, str], use_bias: bool = False, rngs: nnx.Rngs):
        self.keep = keep
        self.block_size = cfg.sparsity.block_size
        self.rescale = cfg.sparsity.rescale
        self.grad = cfg.sparsity.grad
        self.input_norm = cfg.input_norm
        self.norm_eps = cfg.norm_eps
        self.act_bits = cfg.act_bits
        self.weight_bits = cfg.weight_bits
        self.dtype = _dtype(cfg.dtype)
        pdt = _dtype(cfg.param_dtype)
        w = cfg.init_std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (in_features, out_features), pdt)
        self.weight = nnx.Param(w, logical_axes=axes)
        self.bias = nnx.Param(jnp.zeros((out_features,), pdt), logical_axes=(axes[1],)) if use_bias else None

    def sparsify(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        if self.input_norm:
            x = rms_norm(x, self.norm_eps)
        if self.keep is not None:
            x = topk_sparsify(x, self.keep, block_size=self.block_size, rescale=self.rescale, grad=self.grad)
        if self.act_bits == 8:
            x = quantize_activations(x)  # max|x| survives top-K, so the order of the two does not matter
        return x

    def effective_weight(self) -> jax.Array:
        w = self.weight[...]
        if self.weight_bits is not None:
            w = quantize_weights(w, self.weight_bits)
        return w.astype(self.dtype)

    def project(self, xs: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", xs, self.effective_weight())
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.project(self.sparsify(x))


def _zero_count(x: jax.Array) -> jax.Array:
    return jnp.sum(x == 0, dtype=jnp.float32)


class Attention(nnx.Module):
    """Grouped-query causal self-attention with RoPE; q/k/v share one sparsified input."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_size
        self.theta = cfg.rope_theta
        self.window = cfg.sliding_window
        q_out, kv_out = self.n_heads * self.hd, self.n_kv * self.hd
        lin = lambda i, o, keep, axes, bias=False: SparseLinear(i, o, keep=keep, cfg=cfg, axes=axes, use_bias=bias, rngs=rngs)
        self.wq = lin(cfg.dim, q_out, cfg.keep("qkv"), ("embed", "heads"), cfg.qkv_bias)
        self.wk = lin(cfg.dim, kv_out, cfg.keep("qkv"), ("embed", "kv"), cfg.qkv_bias)
        self.wv = lin(cfg.dim, kv_out, cfg.keep("qkv"), ("embed", "kv"), cfg.qkv_bias)
        self.wo = lin(q_out, cfg.dim, cfg.keep("out"), ("heads", "embed"))
        self.subln = RMSNorm(q_out, cfg.norm_eps, param_dtype=_dtype(cfg.param_dtype)) if cfg.subln else None

    def __call__(self, x, positions, segment_ids, stats: dict | None):
        b, s, _ = x.shape
        xs = self.wq.sparsify(x)
        q = self.wq.project(xs).reshape(b, s, self.n_heads, self.hd)
        k = self.wk.project(xs).reshape(b, s, self.n_kv, self.hd)
        v = self.wv.project(xs).reshape(b, s, self.n_kv, self.hd)
        q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
        rep = self.n_heads // self.n_kv
        q = q.reshape(b, s, self.n_kv, rep, self.hd)
        scores = jnp.einsum("bqgrd,bkgd->bgrqk", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(self.hd).astype(jnp.float32)
        delta = positions[:, :, None] - positions[:, None, :]
        mask = delta >= 0  # causal, by position
        if self.window is not None:
            mask = mask & (delta < self.window)
        if segment_ids is not None:  # packed sequences never attend across documents
            mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v).reshape(b, s, self.n_heads * self.hd)
        if self.subln is not None:
            out = self.subln(out)
        os_ = self.wo.sparsify(out)
        if stats is not None:
            stats["qkv"] = stats.get("qkv", 0.0) + _zero_count(xs)
            stats["out"] = stats.get("out", 0.0) + _zero_count(os_)
        return self.wo.project(os_)


class FeedForward(nnx.Module):
    """GLU feed-forward: ``down(up(x) ⊙ act(gate(x)))`` with act = ReLU² (Eq. 11) or SiLU."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.activation = cfg.activation
        lin = lambda i, o, keep, axes: SparseLinear(i, o, keep=keep, cfg=cfg, axes=axes, rngs=rngs)
        self.w_gate = lin(cfg.dim, cfg.hidden_dim, cfg.keep("gate_up"), ("embed", "mlp"))
        self.w_up = lin(cfg.dim, cfg.hidden_dim, cfg.keep("gate_up"), ("embed", "mlp"))
        self.w_down = lin(cfg.hidden_dim, cfg.dim, cfg.keep("down"), ("mlp", "embed"))
        self.subln = RMSNorm(cfg.hidden_dim, cfg.norm_eps, param_dtype=_dtype(cfg.param_dtype)) if cfg.subln else None

    def __call__(self, x, stats: dict | None):
        xs = self.w_gate.sparsify(x)
        g = self.w_gate.project(xs)
        g = jnp.square(jax.nn.relu(g)) if self.activation == "relu2" else jax.nn.silu(g)
        h = self.w_up.project(xs) * g
        if self.subln is not None:
            h = self.subln(h)
        hs = self.w_down.sparsify(h)  # top-K after the activation (SiLU models too)
        if stats is not None:
            stats["gate_up"] = stats.get("gate_up", 0.0) + _zero_count(xs)
            stats["down"] = stats.get("down", 0.0) + _zero_count(hs)
        return self.w_down.project(hs)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = _dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=pdt)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=pdt)
        self.mlp = FeedForward(cfg, rngs=rngs)

    def __call__(self, x, positions, segment_ids, stats: dict | None = None):
        x = x + self.attn(self.attn_norm(x), positions, segment_ids, stats)
        return x + self.mlp(self.mlp_norm(x), stats)
