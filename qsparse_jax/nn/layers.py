"""Transformer building blocks (Flax NNX): RMSNorm, RoPE, SparseLinear, attention, GLU feed-forward.

Every parameter carries ``logical_axes`` metadata (embed, heads, kv, mlp, vocab); ``sharding.py`` maps
those names onto mesh axes, so no layer mentions a mesh.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import ModelConfig, RopeScaling
from ..kernels import TPU_ALIGN, pack_ternary, qsparse_matmul
from ..ops.nm import nm_mask, slorb_apply, slorb_init, slorb_x_init
from ..ops.quant import quantize_activations, quantize_weights
from ..ops.topk import topk_sparsify
from .attention import MaskSpec, attend
from .selection import select_topk
from .sharding import active_mesh, constrain, logical_to_spec, target_platform


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


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling, max_seq_len: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies ``θ^(−2i/d)`` (RoFormer) and the cos/sin scale, after ``scaling``.

    Transcribed from transformers' ``modeling_rope_utils`` (linear, llama3, yarn), float32 like it.
    """
    inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    kind, factor = scaling.type, scaling.factor
    original = scaling.original_max_position_embeddings or max_seq_len
    if kind == "linear":
        return (inv_freq / factor).astype(np.float32), 1.0
    if kind == "llama3":  # Llama 3.1: long wavelengths interpolated, short kept, a smooth band between
        lo_wavelen, hi_wavelen = original / scaling.low_freq_factor, original / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > lo_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    if kind == "yarn":  # YaRN (Peng et al. 2023): ramp from extrapolated (fast) to interpolated (slow) dims
        def mscale(s, m=1.0):
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        att = scaling.attention_factor
        if att is None:
            att = (mscale(factor, scaling.mscale) / mscale(factor, scaling.mscale_all_dim)
                   if scaling.mscale and scaling.mscale_all_dim else mscale(factor))

        def correction_dim(rotations):
            return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
        if scaling.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrapolate = 1 - ramp
        inv = (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate
        return inv.astype(np.float32), float(att)
    return inv_freq, 1.0


def rope(x: jax.Array, positions: jax.Array, inv_freq, scale: float = 1.0) -> jax.Array:
    """Rotary embedding, HF half-split layout: ``x·cos + rotate_half(x)·sin`` (cos, sin times ``scale``).

    x: [batch, seq, heads, head_dim]; positions: [batch, seq] (int); inv_freq: [head_dim/2].
    """
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [b, s, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def kernel_linear(x: jax.Array, w: jax.Array, k: int | None, block_size: int | None, impl: str) -> jax.Array:
    """``Q(Top_k(x)) @ Q_w(w)`` (Eq. 4, 8) through the packed int8 × ternary kernels, differentiable in
    both: ``dx = g·Q_w(w)ᵀ`` (STE, Eq. 13) and ``dw = Q(Top_k(x))ᵀ·g`` — the fake-quant path's gradients."""
    return qsparse_matmul(x, pack_ternary(w), k=k, block_size=block_size, impl=impl)


def _kernel_linear_fwd(x, w, k, block_size, impl):
    return kernel_linear(x, w, k, block_size, impl), (x, w)


def _kernel_linear_bwd(k, block_size, impl, res, g):
    x, w = res
    xq = x if k is None else topk_sparsify(x, k, block_size=block_size)
    xq = quantize_activations(xq).astype(jnp.float32)
    g32 = g.astype(jnp.float32)
    dx = jnp.einsum("...o,io->...i", g32, quantize_weights(w.astype(jnp.float32), "1.58"))
    dw = jnp.einsum("...i,...o->io", xq, g32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


kernel_linear.defvjp(_kernel_linear_fwd, _kernel_linear_bwd)


def _per_device(f, x: jax.Array, w):
    """``f(x, w)`` inside ``shard_map`` on the active mesh (``sharding.activation_sharding``): each device
    its share of the batch and the whole (replicated) packed weight. XLA cannot partition a Pallas call
    ("Mosaic kernels cannot be automatically partitioned"), so a kernel on a mesh must sit in one."""
    mesh = active_mesh()
    if mesh is None:
        return f(x, w)
    spec = logical_to_spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh)
    return jax.shard_map(f, mesh=mesh, in_specs=(spec, jax.sharding.PartitionSpec()), out_specs=spec,
                         check_vma=False)(x, w)


class PackedWeight(nnx.Variable):
    """Inference-only packed ternary weight (``pack_for_inference``); not a trainable ``Param``."""


class WeightMask(nnx.Variable):
    """AST's N:M mask of a weight (bool, True = kept): model state, refreshed by the trainer's method
    (``methods.AdaptiveSparseTraining``), never a trainable ``Param``; sharded like its weight."""


def masked(w: jax.Array, mask: jax.Array) -> jax.Array:
    """``W ⊙ M`` forward, identity backward: pruned weights get the dense gradient (AST; SEEDS §2)."""
    return w + jax.lax.stop_gradient(jnp.where(mask, w, jnp.zeros_like(w)) - w)


class SparseLinear(nnx.Module):
    """``y = Q_w(W)ᵀ · Q(Top_k(norm(x)))`` — every piece optional (Q-Sparse Eq. 2, 4, 8).

    ``sparsify`` is the parameter-free input path (RMSNorm → top-K → int8 fake-quant); ``project`` is
    the matmul with (optionally ternary / 1-bit) weights. Projections that share an input (q/k/v,
    gate/up) call ``sparsify`` once and ``project`` each. The weight is stored [in, out].

    With ``kernels`` on (1.58-bit weights, int8 activations) ``sparsify`` stops after the norm and
    ``project`` runs top-K, int8 quantization and the int8 × ternary matmul in ``kernels.qsparse_matmul``;
    after :func:`pack_for_inference` it reads the pre-packed 2-bit weight instead of packing per call.
    """

    def __init__(self, in_features: int, out_features: int, *, keep: int | None, cfg: ModelConfig,
                 axes: tuple[str, str], use_bias: bool = False, rngs: nnx.Rngs):
        self.keep = keep
        self.block_size = cfg.sparsity.block_size
        self.rescale = cfg.sparsity.rescale
        self.grad = cfg.sparsity.grad
        self.select = cfg.sparsity.select
        self.input_norm = cfg.input_norm
        self.norm_eps = cfg.norm_eps
        self.act_bits = cfg.act_bits
        self.weight_bits = cfg.weight_bits
        self.kernels = cfg.kernels
        self.dtype = _dtype(cfg.dtype)
        pdt = _dtype(cfg.param_dtype)
        w = cfg.init_std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (in_features, out_features), pdt)
        self.weight = nnx.Param(w, logical_axes=axes)
        self.bias = nnx.Param(jnp.zeros((out_features,), pdt), logical_axes=(axes[1],)) if use_bias else None
        self.packed = None
        ws = cfg.weight_sparsity
        self.mask = self.slorb_s = self.slorb_x = None
        self.slorb_group = ws.slorb_group
        if ws.enabled:  # the initial mask and SLoRB from these weights; a loaded model gets both re-made

            mask = nm_mask(jnp.abs(w), ws.n, ws.m)
            self.mask = nnx.data(WeightMask(mask, logical_axes=axes))
            if ws.slorb:
                self.slorb_s = nnx.data(nnx.Param(slorb_init(w, mask, ws.slorb_group).astype(pdt), logical_axes=(None, axes[1])))
                if ws.slorb_train_x:  # the full [in/k, in] projection, the group sums at first
                    self.slorb_x = nnx.data(nnx.Param(slorb_x_init(in_features, ws.slorb_group, pdt),
                                                       logical_axes=(None, axes[0])))

    def sparsify(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        if self.input_norm:
            x = rms_norm(x, self.norm_eps)
        return x if self.kernels != "off" else self._topk_quant(x)

    def _topk_quant(self, x):
        if self.keep is not None:
            x = select_topk(x, self.keep, block_size=self.block_size, rescale=self.rescale, grad=self.grad,
                            select=self.select)
        if self.act_bits == 8:
            x = quantize_activations(x)  # max|x| survives top-K, so the order of the two does not matter
        return x

    def zeros(self, xs: jax.Array) -> jax.Array:
        """Zeros at the matmul input, for ``xs = sparsify(x)`` (the kernels sparsify inside)."""
        return _zero_count(self._topk_quant(xs) if self.kernels != "off" else xs)

    def masked_weight(self) -> jax.Array:
        """The latent weight, ``⊙ M`` (straight-through) under AST."""
        w = self.weight[...]
        return w if self.mask is None else masked(w, self.mask[...])

    def effective_weight(self) -> jax.Array:
        """``Q_w(W ⊙ M)``: the quantizer sees the masked latent weight, so the ternary scale is
        ``mean|W ⊙ M|`` over all entries (zeros included, as the kernels' packing computes it); the
        mask is applied again after quantization because 1-bit quantization maps zeros to ±α."""
        w = self.masked_weight()
        if self.weight_bits is not None:
            w = quantize_weights(w, self.weight_bits)
            if self.mask is not None:
                w = jnp.where(self.mask[...], w, jnp.zeros_like(w))
        return w.astype(self.dtype)

    def _slorb(self, xq: jax.Array) -> jax.Array:
        """SLoRB ``S · (X x)`` of the matmul input (``weight_sparsity.slorb_apply``)."""

        x = None if self.slorb_x is None else self.slorb_x[...].astype(self.dtype)
        return slorb_apply(xq, self.slorb_s[...].astype(self.dtype), self.slorb_group, x).astype(self.dtype)

    def project(self, xs: jax.Array) -> jax.Array:
        if self.kernels == "off":
            y = jnp.einsum("...i,io->...o", xs, self.effective_weight())
        else:
            impl = "auto" if self.kernels == "on" else self.kernels
            bs = self.block_size if self.keep is not None else None  # a dense group ignores the block size
            if self.packed is not None:
                y = _per_device(lambda x, w: qsparse_matmul(x, w, k=self.keep, block_size=bs, impl=impl), xs,
                                self.packed.get_value())
            else:
                y = kernel_linear(xs, self.masked_weight(), self.keep, bs, impl)
            y = y.astype(self.dtype)
        if self.slorb_s is not None:
            y = y + self._slorb(xs if self.kernels == "off" else self._topk_quant(xs))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.project(self.sparsify(x))


PACK_LAYOUTS = ("auto", "bytes", "tpu")


def pack_for_inference(model: nnx.Module, bits: float = 2, layout: str = "auto") -> nnx.Module:
    """A copy of ``model`` whose kernel-enabled projections read pre-packed ternary weights (2-bit, or
    1.6-bit base 3): decoding then reads only the packed rows of the kept features (SEEDS §4).

    ``layout``: ``"bytes"`` (uint8, read by the CPU and GPU paths), ``"tpu"`` (``kernels.tpu_layout``:
    uint32 words, columns a multiple of 128, so the TPU decode kernel copies only the kept rows by DMA
    and no relayout copy precedes a call), or ``"auto"``: ``"tpu"`` when the program is compiled for a
    TPU (``sharding.target_platform``: the active mesh's devices, else the default backend).

    The copy is for inference: its packed projections hold no float weight or mask (both are in the
    packed words), so it cannot be trained or exported; ``model`` itself keeps them."""
    if layout not in PACK_LAYOUTS:
        raise ValueError(f"layout must be one of {PACK_LAYOUTS}, got {layout!r}")
    if layout == "auto":
        layout = "tpu" if target_platform() == "tpu" else "bytes"
    words = dict(unit=jnp.uint32, align=TPU_ALIGN) if layout == "tpu" else {}
    model = nnx.clone(model)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, SparseLinear) and m.kernels != "off":
            w = m.masked_weight()
            pack = lambda w: pack_ternary(w, bits, **words)
            m.packed = nnx.data(PackedWeight(jax.vmap(pack)(w) if w.ndim == 3 else pack(w)))  # scan_layers: stacked
            # the packed copy is all the projection reads from now on: the float weight (16x the 2-bit
            # words in float32) and the mask already in it are dropped, not carried beside it
            m.weight = m.mask = None
    return model


def _zero_count(x: jax.Array) -> jax.Array:
    return jnp.sum(x == 0, dtype=jnp.float32)


class Attention(nnx.Module):
    """Grouped-query causal self-attention with RoPE; q/k/v share one sparsified input."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_size
        # a plain tuple, not an array: nnx would otherwise treat it as state
        inv_freq, self.rope_scale = rope_frequencies(self.hd, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)
        self.inv_freq = tuple(float(f) for f in inv_freq)
        self.window = cfg.sliding_window
        self.impl = cfg.attention
        q_out, kv_out = self.n_heads * self.hd, self.n_kv * self.hd
        lin = lambda i, o, keep, axes, bias=False: SparseLinear(i, o, keep=keep, cfg=cfg, axes=axes, use_bias=bias, rngs=rngs)
        self.wq = lin(cfg.dim, q_out, cfg.keep("qkv"), ("embed", "heads"), cfg.qkv_bias)
        self.wk = lin(cfg.dim, kv_out, cfg.keep("qkv"), ("embed", "kv"), cfg.qkv_bias)
        self.wv = lin(cfg.dim, kv_out, cfg.keep("qkv"), ("embed", "kv"), cfg.qkv_bias)
        self.wo = lin(q_out, cfg.dim, cfg.keep("out"), ("heads", "embed"))
        self.subln = RMSNorm(q_out, cfg.norm_eps, param_dtype=_dtype(cfg.param_dtype)) if cfg.subln else None

    def __call__(self, x, positions, segment_ids, stats: dict | None, cache: dict | None = None):
        """With ``cache`` (``k``, ``v``: [batch, max_len, kv_heads, head_dim], ``index``: tokens already
        cached) the new keys/values are written at ``index`` and queries attend over the whole cache;
        returns ``(out, cache)``. Cached key ``j`` sits at position ``j`` (contiguous generation)."""
        b, s, _ = x.shape
        xs = self.wq.sparsify(x)
        q = constrain(self.wq.project(xs).reshape(b, s, self.n_heads, self.hd), ("batch", "length", "act_heads", None))
        k = constrain(self.wk.project(xs).reshape(b, s, self.n_kv, self.hd), ("batch", "length", "act_kv", None))
        v = constrain(self.wv.project(xs).reshape(b, s, self.n_kv, self.hd), ("batch", "length", "act_kv", None))
        by_index = positions is None  # positions 0..s-1 in every row: fused kernels may mask by index
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        q, k = (rope(t, positions, np.asarray(self.inv_freq, np.float32), self.rope_scale) for t in (q, k))
        if cache is not None:
            at = (0, cache["index"], 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), at)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), at)
            cache = {"k": k, "v": v, "index": cache["index"] + s}
            key_pos = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=positions.dtype), (b, k.shape[1]))
            spec = MaskSpec(positions, key_pos, self.window, k_valid=jnp.arange(k.shape[1]) < cache["index"])
        else:
            spec = MaskSpec(positions, positions, self.window, q_seg=segment_ids, k_seg=segment_ids, by_index=by_index)
        out = attend(q, k, v, spec, self.impl).reshape(b, s, self.n_heads * self.hd)
        out = constrain(out, ("batch", "length", "act_heads"))
        if self.subln is not None:
            out = self.subln(out)
        os_ = self.wo.sparsify(out)
        if stats is not None:
            stats["qkv"] = stats.get("qkv", 0.0) + self.wq.zeros(xs)
            stats["out"] = stats.get("out", 0.0) + self.wo.zeros(os_)
        out = constrain(self.wo.project(os_), ("batch", "length", "act_embed"))
        return out if cache is None else (out, cache)


def glu_activation(g: jax.Array, activation: str) -> jax.Array:
    """ReLU² (Q-Sparse Eq. 11) or SiLU of the gate projection."""
    return jnp.square(jax.nn.relu(g)) if activation == "relu2" else jax.nn.silu(g)


class FeedForward(nnx.Module):
    """GLU feed-forward: ``down(up(x) ⊙ act(gate(x)))`` with act = ReLU² (Eq. 11) or SiLU."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.activation = cfg.activation
        lin = lambda i, o, keep, axes: SparseLinear(i, o, keep=keep, cfg=cfg, axes=axes, rngs=rngs)
        self.w_gate = lin(cfg.dim, cfg.hidden_dim, cfg.keep("gate_up"), ("embed", "mlp"))
        self.w_up = lin(cfg.dim, cfg.hidden_dim, cfg.keep("gate_up"), ("embed", "mlp"))
        self.w_down = lin(cfg.hidden_dim, cfg.dim, cfg.keep("down"), ("mlp", "embed"))
        self.subln = RMSNorm(cfg.hidden_dim, cfg.norm_eps, param_dtype=_dtype(cfg.param_dtype)) if cfg.subln else None

    def hidden(self, x) -> tuple[jax.Array, jax.Array]:
        """(the gate/up input after ``sparsify``, the hidden ``up(x) ⊙ act(gate(x))``)."""
        xs = self.w_gate.sparsify(x)
        g = constrain(glu_activation(self.w_gate.project(xs), self.activation), ("batch", "length", "act_mlp"))
        return xs, constrain(self.w_up.project(xs) * g, ("batch", "length", "act_mlp"))

    def output(self, xs, h, stats: dict | None):
        """``down(h)`` (after SubLN and top-K: top-K after the activation, SiLU models too); with ``stats``
        adds the zero counts at the gate/up and down inputs."""
        if self.subln is not None:
            h = self.subln(h)
        hs = self.w_down.sparsify(h)
        if stats is not None:
            stats["gate_up"] = stats.get("gate_up", 0.0) + self.w_gate.zeros(xs)
            stats["down"] = stats.get("down", 0.0) + self.w_down.zeros(hs)
        return constrain(self.w_down.project(hs), ("batch", "length", "act_embed"))

    def __call__(self, x, stats: dict | None):
        return self.output(*self.hidden(x), stats)

