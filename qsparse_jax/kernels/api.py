"""``qsparse_matmul``: the one entry point, with input checks, kernel choice and a custom VJP.

``y = quantize_activations(topk_sparsify(x, k)) @ dequantize(w)`` (Eq. 4, 8) computed as
``(Σ q·t as int32) / (s · s_w)`` (see ``reference``):

- few tokens (≤ ``DECODE_MAX_TOKENS``) with top-K: decode path, reading only the packed rows of the
  features any token keeps;
- otherwise: int8 × ternary matmul over all rows (Block Q-Sparse N:M inputs included).

``impl``: ``"auto"`` (Pallas on GPU/TPU, XLA on CPU), ``"xla"``, ``"pallas"``, ``"interpret"``
(the Pallas kernels run by the Pallas interpreter: slow, any backend, for tests). ``auto`` and
``pallas`` go by the platform the program is compiled for, not the host's default backend, so a TPU
slice compiled from a CPU host gets the Mosaic kernels (``_accumulate``).

Backward (training): straight-through through top-K and both quantizers, so ``dx = g @ W_deqᵀ``
(Eq. 13 and the quantizers' STE); the packed weight receives zero cotangents. Training updates the
float weight through ``quant.quantize_weights``; pack it again (``pack_ternary``) for inference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jax.interpreters import mlir

from . import pallas as _pallas
from . import reference as _ref
from .packing import PackedTernary, dequantize, layout_error

IMPLS = ("auto", "xla", "pallas", "interpret")
DECODE_MAX_TOKENS = 8
GATHER_MAX_UNION = 0.75  # XLA path: gather kept rows only below this expected fraction of rows


def _validate(x, w, k, block_size, impl):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(w, PackedTernary):
        raise ValueError(f"w must be a PackedTernary (kernels.pack_ternary(weight)), got {type(w).__name__}")
    if (err := layout_error(w)) is not None:  # bytes, or the TPU words layout (packing.tpu_layout)
        raise ValueError(err)
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


def _check_eager(x, impl: str) -> None:
    """``impl='pallas'`` run eagerly (not traced) needs a GPU/TPU default backend; traced, the platform
    the program is lowered for decides (``_accumulate``), and a CPU one fails there (``_no_kernel_p``)."""
    backend = jax.default_backend()
    if impl == "pallas" and not isinstance(x, jax.core.Tracer) and backend not in ("gpu", "tpu"):
        raise ValueError(f"impl='pallas' needs a gpu or tpu backend, this one is {backend}; "
                         f"allowed here: 'auto', 'xla', 'interpret'")


def _no_kernel_lowering(ctx, x):
    raise ValueError(f"impl='pallas' needs a gpu or tpu target, this program is compiled for "
                     f"{', '.join(ctx.module_context.platforms)}; allowed there: 'auto', 'xla', 'interpret'")


# the CPU branch of impl='pallas': traced like every platform_dependent branch, an error only if lowered
_no_kernel_p = jex_core.Primitive("qsparse_no_pallas_kernel")
_no_kernel_p.def_abstract_eval(lambda x: x)
mlir.register_lowering(_no_kernel_p, _no_kernel_lowering)


def _xla_accumulate(q, w: PackedTernary, decode: bool, kept: int, rows: int):
    m, d = q.shape
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


def _pallas_accumulate(q, w: PackedTernary, decode: bool, rows: int, target: str | None, interpret: bool = False):
    """The Pallas kernels for ``target`` (``"tpu"``: Mosaic, ``"gpu"``: Triton; ``None`` with ``interpret``:
    the default backend's forms, run by the interpreter)."""
    # TPU decode reads only the kept rows by DMA, which needs whole 32-bit word rows (packing.tpu_layout)
    if decode and (interpret or target == "gpu" or (target == "tpu" and w.data.dtype == jnp.uint32)):
        if target == "tpu":  # one on-chip sort (no SparseCore scatter, no column gather)
            idx, count, qg = _ref.kept_rows_sorted(q, rows)
        else:
            idx, count = _ref.kept_rows(q, rows)
            qg = _ref.gather_columns(q, idx, count)
        acc = _pallas.gather_matmul(count[None], idx, qg, w.data, bits=w.bits, interpret=interpret, target=target)
    else:  # the batched kernel (also TPU decode of bytes: Mosaic has no vector gather from a ref)
        acc = _pallas.matmul(q, w.data, bits=w.bits, interpret=interpret, target=target)
    return _pallas.planes_to_columns(acc, w.out_features)


def _accumulate(q, w: PackedTernary, k, block_size, impl):
    """Exact int32 accumulator ``[M, out]`` of int8 ``q [M, D]`` by the chosen implementation.

    ``auto`` / ``pallas`` choose by the platform the program is lowered for (``lax.platform_dependent``:
    every branch is traced, only the target's is lowered), so a program compiled on a CPU host for a
    TPU slice gets the Mosaic kernels; ``jax.default_backend()`` would be the host's CPU there."""
    m, d = q.shape
    kept = d if k is None else (k * (d // block_size) if block_size else k)
    decode = kept < d and m <= DECODE_MAX_TOKENS
    rows = min(d, m * kept)
    if impl == "xla":
        return _xla_accumulate(q, w, decode, kept, rows)
    if impl == "interpret":
        return _pallas_accumulate(q, w, decode, rows, None, interpret=True)
    on = lambda target: lambda q, w: _pallas_accumulate(q, w, decode, rows, target)
    gpu = on("gpu")  # one branch for both GPU platforms
    if impl == "auto":
        other = lambda q, w: _xla_accumulate(q, w, decode, kept, rows)
    else:
        other = lambda q, w: _no_kernel_p.bind(jnp.zeros((m, w.out_features), jnp.int32))
    return jax.lax.platform_dependent(q, w, tpu=on("tpu"), cuda=gpu, rocm=gpu, default=other)


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
    _check_eager(x, impl)
    return _qsparse_matmul(x, w, k, block_size, impl)
