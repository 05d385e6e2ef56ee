"""``qsparse_matmul``: the one entry point, with input checks, kernel choice and a custom VJP.

``y = quantize_activations(topk_sparsify(x, k)) @ dequantize(w)`` (Eq. 4, 8) computed as
``(Σ q·t as int32) / (s · s_w)`` (see ``reference``):

- few tokens (≤ ``DECODE_MAX_TOKENS``) with top-K: decode path, reading only the packed rows of the
  features any token keeps;
- otherwise: int8 × ternary matmul over all rows (Block Q-Sparse N:M inputs included).

``impl``: ``"auto"`` (Pallas on GPU/TPU, XLA on CPU), ``"xla"``, ``"pallas"``, ``"interpret"``
(the Pallas kernels run by the Pallas interpreter: slow, any backend, for tests).

Backward (training): straight-through through top-K and both quantizers, so ``dx = g @ W_deqᵀ``
(Eq. 13 and the quantizers' STE); the packed weight receives zero cotangents. Training updates the
float weight through ``quant.quantize_weights``; pack it again (``pack_ternary``) for inference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import pallas as _pallas
from . import reference as _ref
from .packing import PackedTernary, dequantize

IMPLS = ("auto", "xla", "pallas", "interpret")
DECODE_MAX_TOKENS = 8
GATHER_MAX_UNION = 0.75  # XLA path: gather kept rows only below this expected fraction of rows


def _validate(x, w, k, block_size, impl):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(w, PackedTernary):
        raise ValueError(f"w must be a PackedTernary (kernels.pack_ternary(weight)), got {type(w).__name__}")
    if w.data.ndim != 2 or w.data.dtype != jnp.uint8:
        raise ValueError(f"w.data must be uint8 [in, ceil(out/{w.per_byte})], got {w.data.dtype}{list(w.data.shape)}")
    if w.data.shape[1] != -(-w.out_features // w.per_byte):
        raise ValueError(f"w.data has {w.data.shape[1]} packed columns; out_features={w.out_features} "
                         f"needs {-(-w.out_features // w.per_byte)}")
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim < 1:
        raise ValueError(f"x must be a float array [..., in_features], got {getattr(x, 'dtype', type(x).__name__)}"
                         f"{list(getattr(x, 'shape', []))}")
    d = x.shape[-1]
    if d != w.in_features:
        raise ValueError(f"x has {d} input features but w has in_features={w.in_features}")
    per = d
    if block_size is not None:
        if not isinstance(block_size, (int, np.integer)) or block_size < 1 or d % block_size:
            raise ValueError(f"block_size must be None or a positive divisor of in_features {d}, got {block_size!r}")
        per = int(block_size)
    if k is not None and (not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= per):
        raise ValueError(f"k must be None (dense) or an integer in [1, {per}] (kept per "
                         f"{'block' if block_size else 'token'}), got {k!r}")


def _resolve(impl: str) -> str:
    backend = jax.default_backend()
    if impl == "auto":
        return "pallas" if backend in ("gpu", "tpu") else "xla"
    if impl == "pallas" and backend not in ("gpu", "tpu"):
        raise ValueError(f"impl='pallas' needs a gpu or tpu backend, this one is {backend}; "
                         f"allowed here: 'auto', 'xla', 'interpret'")
    return impl


def _accumulate(q, w: PackedTernary, k, block_size, impl):
    """Exact int32 accumulator ``[M, out]`` of int8 ``q [M, D]`` by the chosen implementation."""
    m, d = q.shape
    kept = d if k is None else (k * (d // block_size) if block_size else k)
    decode = kept < d and m <= DECODE_MAX_TOKENS
    rows = min(d, m * kept)
    if impl == "xla":
        # gathering rows pays on CPU only while the tokens' kept sets together leave many rows out:
        # the expected union is 1 − (1 − k/D)^M of the rows (measured: batch 1 yes, batch 8 no)
        decode = decode and 1.0 - (1.0 - kept / d) ** m < GATHER_MAX_UNION
        # fastest measured CPU formulations (benchmarks/RESULTS.md, "kernels" section)
        if d >= _ref.F32_EXACT_MAX_D:  # float32 sums would no longer be exact
            return _ref.accumulate_reference(q, w)
        if decode:
            return _ref.accumulate_chunked(q, w, *_ref.kept_rows(q, rows))
        # XLA's int8 dot is ~6x slower than float32 for one row (a GEMV), faster from a few rows (a GEMM)
        return _ref.accumulate_chunked(q, w) if m == 1 else _ref.accumulate_reference(q, w)
    interpret = impl == "interpret"
    if decode and (interpret or jax.default_backend() != "tpu"):
        idx, count = _ref.kept_rows(q, rows)
        qg = _ref.gather_columns(q, idx, count)
        acc = _pallas.gather_matmul(count[None], idx, qg, w.data, bits=w.bits, interpret=interpret)
    else:  # the batched kernel (also TPU decode: Mosaic has no vector gather from a ref)
        acc = _pallas.matmul(q, w.data, bits=w.bits, interpret=interpret)
    return _pallas.planes_to_columns(acc, w.out_features)


def _forward(x, w, k, block_size, impl):
    lead = x.shape[:-1]
    q, s = _ref.quantize_input(x.reshape(-1, x.shape[-1]), k, block_size)
    acc = _accumulate(q, w, k, block_size, impl)
    return _ref.scale_output(acc, s, w.scale).reshape(*lead, w.out_features)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _qsparse_matmul(x, w, k, block_size, impl):
    return _forward(x, w, k, block_size, impl)


def _fwd(x, w, k, block_size, impl):
    return _forward(x, w, k, block_size, impl), (w, jnp.zeros((0,), x.dtype))  # an empty array carries x's dtype


def _zero_cotangent(a):
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros(a.shape, a.dtype)
    return np.zeros(a.shape, jax.dtypes.float0)


def _bwd(k, block_size, impl, res, g):
    w, like = res
    # STE through top-K (Eq. 13) and both quantizers: dx = g · W_deqᵀ
    dx = jnp.einsum("...n,dn->...d", g.astype(jnp.float32), dequantize(w)).astype(like.dtype)
    return dx, jax.tree.map(_zero_cotangent, w)


_qsparse_matmul.defvjp(_fwd, _bwd)


def qsparse_matmul(x: jax.Array, w: PackedTernary, *, k: int | None, block_size: int | None = None,
                   impl: str = "auto") -> jax.Array:
    """``quantize_activations(topk_sparsify(x, k, block_size)) @ dequantize(w)``, float32 ``[..., out]``.

    x: float ``[..., in]``; w: ``pack_ternary(weight[in, out])``; k: kept entries per token (per block
    of ``block_size`` for N:M), ``None`` or ``in`` = dense input; impl: one of ``IMPLS``.
    Equals the reference on the int32 accumulator exactly and on y within float32 rounding, and
    the training forward ``quantize_activations(topk_sparsify(x, k)) @ quantize_weights(weight)``
    within float32 rounding. Differentiable in x (STE); w gets zero cotangents."""
    _validate(x, w, k, block_size, impl)
    k = None if k is None or (block_size is None and k == x.shape[-1]) or k == block_size else int(k)
    block_size = None if k is None or block_size is None else int(block_size)
    return _qsparse_matmul(x, w, k, block_size, _resolve(impl))
