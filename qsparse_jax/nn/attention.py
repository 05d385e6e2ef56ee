"""Scaled dot-product attention: one reference, one memory-linear form for every backend, fused kernels.

``attend(q, k, v, mask_spec, impl)`` with q [b, s, h, d], k / v [b, t, g, d] (GQA: g divides h) and
the mask given by positions: query i sees key j when ``0 ≤ qpos_i − kpos_j`` (causal), ``< window``
(sliding window), ``key_valid_j`` (filled KV-cache slots) and ``qseg_i = kseg_j`` (packed documents).

- ``xla``: ``softmax(q kᵀ / √d) v`` with the whole [b, h, s, t] score matrix (the reference; fine on CPU).
- ``chunked``: the same function computed over key blocks with an online softmax (Milakov & Gimelshein
  2018; FlashAttention's recurrence) under ``lax.scan`` with a rematerialized body, so memory is
  linear in the sequence length in the forward and the backward pass; plain XLA, so GSPMD partitions
  it like any other op.
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` on NVIDIA GPUs (causal by index,
  sliding window; no packed segments).
- ``flash``: the Pallas TPU FlashAttention kernel (``jax.experimental.pallas.ops.tpu.flash_attention``)
  inside ``shard_map`` over the batch and head axes (a Pallas call is not partitioned by GSPMD);
  causal by index, packed segments; no sliding window.
``auto`` picks flash on TPU, cudnn on GPU and xla on CPU (the platform of the mesh the program is
compiled for, so a TPU slice compiled from a CPU host gets flash), and falls back to ``chunked`` where the
fused kernel does not implement the mask; decode (at most ``DECODE_QUERIES`` queries against a KV cache)
takes ``xla`` everywhere: its scores are small, and ``chunked``'s key-block scan reads more.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from .sharding import active_mesh, logical_to_spec, target_platform

IMPLS = ("auto", "xla", "chunked", "cudnn", "flash")
DECODE_QUERIES = 16  # queries against a KV cache up to which auto attends with all scores at once
NEG = float(jnp.finfo(jnp.float32).min)


@dataclass(frozen=True)
class MaskSpec:
    """What decides which keys a query sees (see module docstring); positions are int [b, s] / [b, t]."""

    q_pos: jax.Array
    k_pos: jax.Array
    window: int | None = None
    k_valid: jax.Array | None = None  # bool [t]: filled KV-cache slots
    q_seg: jax.Array | None = None
    k_seg: jax.Array | None = None
    by_index: bool = False  # positions are 0..s-1 in every row (no cache): fused kernels may use is_causal

    def block(self, lo: int, size: int) -> jax.Array:
        """bool [b, s, size]: the mask against keys ``lo .. lo+size``."""
        kp = jax.lax.dynamic_slice_in_dim(self.k_pos, lo, size, axis=1)
        delta = self.q_pos[:, :, None] - kp[:, None, :]
        m = delta >= 0
        if self.window is not None:
            m = m & (delta < self.window)
        if self.k_valid is not None:
            m = m & jax.lax.dynamic_slice_in_dim(self.k_valid, lo, size)[None, None, :]
        if self.q_seg is not None:
            ks = jax.lax.dynamic_slice_in_dim(self.k_seg, lo, size, axis=1)
            m = m & (self.q_seg[:, :, None] == ks[:, None, :])
        return m


def attention_xla(q, k, v, spec: MaskSpec) -> jax.Array:
    """The reference: all scores at once, float32 softmax."""
    b, s, h, d = q.shape
    g = k.shape[2]
    qg = q.reshape(b, s, g, h // g, d)
    scores = jnp.einsum("bqgrd,bkgd->bgrqk", qg, k, preferred_element_type=jnp.float32) / jnp.float32(math.sqrt(d))
    mask = spec.block(0, k.shape[1])
    scores = jnp.where(mask[:, None, None], scores, NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bgrqk,bkgd->bqgrd", probs, v).reshape(b, s, h, d)


def attention_chunked(q, k, v, spec: MaskSpec, block: int = 512) -> jax.Array:
    """Online-softmax attention over key blocks of ``block`` (FlashAttention's recurrence, in XLA):
    for each block j, ``m' = max(m, max_j s)``, ``l' = e^{m−m'} l + Σ_j e^{s−m'}``,
    ``o' = e^{m−m'} o + e^{s−m'} v_j``; the output is ``o / l``. The backward pass is FlashAttention's
    too (a custom VJP from the saved output and log-sum-exp, recomputing each block's scores), so
    neither pass keeps anything quadratic in the sequence length. Masked scores contribute exactly 0."""
    b, s, h, d = q.shape
    t, g = k.shape[1], k.shape[2]
    block = min(block, t)
    pad = -t % block
    valid = jnp.arange(t + pad) < t if spec.k_valid is None else jnp.pad(spec.k_valid, (0, pad))
    k_pos = jnp.pad(spec.k_pos, ((0, 0), (0, pad)))
    if pad:  # whole blocks; padded keys are invalid
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    segs = (jnp.zeros((b, s), jnp.int32), jnp.zeros((b, t + pad), jnp.int32)) if spec.q_seg is None else \
        (spec.q_seg, jnp.pad(spec.k_seg, ((0, 0), (0, pad)), constant_values=-1))
    out = _flash(q.reshape(b, s, g, h // g, d), k, v, spec.q_pos, k_pos, valid, *segs, spec.window, block)
    return out.reshape(b, s, h, d)


def _block_scores(q, k, qpos, kpos, valid, qseg, kseg, window, lo, block):
    """Scaled scores [b, g, r, s, block] of keys ``lo .. lo+block`` and their mask."""
    kj = jax.lax.dynamic_slice_in_dim(k, lo, block, axis=1)
    sc = jnp.einsum("bqgrd,bkgd->bgrqk", q, kj, preferred_element_type=jnp.float32) / jnp.float32(math.sqrt(q.shape[-1]))
    spec = MaskSpec(qpos, kpos, window, valid, qseg, kseg)
    return sc, spec.block(lo, block)[:, None, None]


def _flash_forward(q, k, v, qpos, kpos, valid, qseg, kseg, window, block):
    b, s, g, r, d = q.shape

    def body(carry, j):
        m, l, o = carry
        sc, mask = _block_scores(q, k, qpos, kpos, valid, qseg, kseg, window, j * block, block)
        m_new = jnp.maximum(m, jnp.max(jnp.where(mask, sc, NEG), axis=-1))
        p = jnp.exp(jnp.where(mask, sc - m_new[..., None], NEG))
        corr = jnp.exp(m - m_new)
        vj = jax.lax.dynamic_slice_in_dim(v, j * block, block, axis=1)
        o = corr[..., None] * o + jnp.einsum("bgrqk,bkgd->bgrqd", p.astype(v.dtype), vj,
                                             preferred_element_type=jnp.float32)
        return (m_new, corr * l + jnp.sum(p, axis=-1), o), None

    init = (jnp.full((b, g, r, s), NEG, jnp.float32), jnp.zeros((b, g, r, s), jnp.float32),
            jnp.zeros((b, g, r, s, d), jnp.float32))
    (m, l, o), _ = jax.lax.scan(body, init, jnp.arange(k.shape[1] // block))
    seen = l > 0  # a query that sees no key (never in causal LM) gets 0
    o = o / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
    return jnp.einsum("bgrqd->bqgrd", o).astype(v.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _flash(q, k, v, qpos, kpos, valid, qseg, kseg, window, block):
    return _flash_forward(q, k, v, qpos, kpos, valid, qseg, kseg, window, block)[0]


def _flash_fwd(q, k, v, qpos, kpos, valid, qseg, kseg, window, block):
    out, lse = _flash_forward(q, k, v, qpos, kpos, valid, qseg, kseg, window, block)
    return out, (q, k, v, qpos, kpos, valid, qseg, kseg, out, lse)


def _flash_bwd(window, block, res, dout):
    """dv_j = Pᵀ dO, dP = dO v_jᵀ, dS = P ∘ (dP − rowsum(dO ∘ O)), dq += dS k_j / √d, dk_j = dSᵀ q / √d."""
    q, k, v, qpos, kpos, valid, qseg, kseg, out, lse = res
    b, s, g, r, d = q.shape
    do = jnp.einsum("bqgrd->bgrqd", dout.astype(jnp.float32))
    delta = jnp.sum(do * jnp.einsum("bqgrd->bgrqd", out.astype(jnp.float32)), axis=-1)
    scale = jnp.float32(1.0 / math.sqrt(d))

    def body(dq, j):
        lo = j * block
        sc, mask = _block_scores(q, k, qpos, kpos, valid, qseg, kseg, window, lo, block)
        p = jnp.exp(jnp.where(mask, sc - lse[..., None], NEG))
        kj = jax.lax.dynamic_slice_in_dim(k, lo, block, axis=1).astype(jnp.float32)
        vj = jax.lax.dynamic_slice_in_dim(v, lo, block, axis=1).astype(jnp.float32)
        dv = jnp.einsum("bgrqk,bgrqd->bkgd", p, do)
        ds = p * (jnp.einsum("bgrqd,bkgd->bgrqk", do, vj) - delta[..., None])
        dq = dq + jnp.einsum("bgrqk,bkgd->bqgrd", ds, kj) * scale
        dk = jnp.einsum("bgrqk,bqgrd->bkgd", ds, q.astype(jnp.float32)) * scale
        return dq, (dk, dv)

    n = k.shape[1] // block
    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), jnp.arange(n))
    unblock = lambda x, like: jnp.moveaxis(x, 0, 1).reshape(like.shape).astype(like.dtype)
    return (dq.astype(q.dtype), unblock(dk, k), unblock(dv, v), None, None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention_cudnn(q, k, v, spec: MaskSpec) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(
        None if spec.window is None else (spec.window - 1, 0)), implementation="cudnn")


def attention_flash(q, k, v, spec: MaskSpec) -> jax.Array:
    """Pallas TPU FlashAttention per shard: batch over the data-parallel axes, heads over tensor."""
    from jax.experimental.pallas.ops.tpu.flash_attention import (
        SegmentIds,
        flash_attention,
    )
    from jax.sharding import PartitionSpec as P

    b, s, h, d = q.shape
    rep = h // k.shape[2]
    if rep > 1:  # the kernel wants as many kv heads as query heads
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    seg = spec.q_seg

    def local(q, k, v, seg):
        tr = lambda x: x.transpose(0, 2, 1, 3)  # [b, h, s, d]
        ids = None if seg is None else SegmentIds(q=seg, kv=seg)
        out = flash_attention(tr(q), tr(k), tr(v), segment_ids=ids, causal=True, sm_scale=1.0 / math.sqrt(d))
        return tr(out)

    mesh = active_mesh()
    if mesh is None or mesh.size == 1:
        return local(q, k, v, seg)
    qs = logical_to_spec(("batch", "length", "act_heads", None), q.shape, mesh)
    if seg is None:
        fn = jax.shard_map(lambda q, k, v: local(q, k, v, None), mesh=mesh, in_specs=(qs, qs, qs), out_specs=qs,
                           check_vma=False)
        return fn(q, k, v)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(qs, qs, qs, P(qs[0], None)), out_specs=qs, check_vma=False)
    return fn(q, k, v, seg)


CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def resolve(impl: str, spec: MaskSpec, platform: str | None = None, dtype=None) -> str:
    """The implementation ``impl`` means here: ``auto`` by the platform compiled for (cuDNN only for 16-bit activations,
    the only ones its fused attention takes); fused kernels fall back to ``chunked`` for masks they do
    not implement. An explicit ``cudnn`` with other activations is an error."""
    platform = platform or target_platform()
    half = dtype is None or jnp.dtype(dtype) in CUDNN_DTYPES
    if impl == "auto" and spec.k_valid is not None and spec.q_pos.shape[1] <= DECODE_QUERIES:
        return "xla"
    if impl == "auto":
        impl = {"tpu": "flash", "gpu": "cudnn" if half else "chunked"}.get(platform, "xla")
    elif impl == "cudnn" and not half:
        raise ValueError(f"attention=cudnn needs bfloat16 or float16 activations, got {jnp.dtype(dtype).name}; "
                         "use attention=auto (chunked for float32 on GPU) or chunked")
    if impl == "cudnn" and (not spec.by_index or spec.q_seg is not None):
        return "chunked"
    if impl == "flash" and (not spec.by_index or spec.window is not None or spec.q_pos.shape[1] % 128):
        return "chunked"  # the kernel's blocks are 128 tokens
    return impl


def attend(q, k, v, spec: MaskSpec, impl: str = "auto") -> jax.Array:
    """Attention output [b, s, h, d] by ``impl`` (module docstring)."""
    return {"xla": attention_xla, "chunked": attention_chunked, "cudnn": attention_cudnn,
            "flash": attention_flash}[resolve(impl, spec, dtype=q.dtype)](q, k, v, spec)

