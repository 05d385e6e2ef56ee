"""Pure-XLA forms of the quantized sparse matmul: the reference the Pallas kernels must equal.

``y = quantize_activations(topk_sparsify(x, k)) @ dequantize(w)`` computed on the integer path:

- ``x̃ = topk_sparsify(x, k)`` (Eq. 2–3; per block of ``block_size`` for N:M), then per-token absmax
  int8 ``q = clip(round(x̃·s), −128, 127)``, ``s = 127/max(max|x̃|, 1e-5)`` (Eq. 5–7);
- ternary levels ``t`` and ``s_w = 1/max(mean|w|, 1e-5)`` of the packed weight (Eq. 9–10);
- ``acc = Σ_i q_i·t_i`` exactly (int32), ``y = acc / (s·s_w)`` (Eq. 8 with the scales pulled out).

The training-time fake-quant forward ``(q/s) @ (t/s_w)`` is the same sum with each product rounded
in float32 first, so the two agree within float32 rounding (a few ulp of ``Σ|q·t|/(s·s_w)``).

The accumulator can also be computed in float32 or bfloat16-in/float32-out: levels are integers of
at most 8 bits (exact in bfloat16) and every partial sum is an integer below ``128·D``, exact in
float32 while ``D < 2^17``, whatever the summation order. The CPU formulations below use that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ..ops.quant import activation_int8
from ..ops.topk import topk_sparsify
from .packing import PackedTernary, unpack_levels, unpack_planes

F32_EXACT_MAX_D = 1 << 17  # 128 · D < 2^24: float32 sums of the int8 × ternary products are exact


def quantize_input(x: jax.Array, k: int | None, block_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """int8 ``q [M, D]`` and scale ``s [M, 1]`` of ``topk_sparsify(x, k)`` (Eq. 2–7); ``k=None``: dense."""
    xs = x if k is None else topk_sparsify(x, k, block_size=block_size)
    return activation_int8(xs)


def scale_output(acc: jax.Array, s: jax.Array, w_scale: jax.Array) -> jax.Array:
    """``y = acc / (s · s_w)`` in float32: both scales applied once, at the end."""
    return acc.astype(jnp.float32) / (s * w_scale)


def int8_dot(q: jax.Array, t: jax.Array) -> jax.Array:
    """``q @ t`` for int8 operands with an int32 accumulator."""
    return lax.dot_general(q, t, (((q.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)


def accumulate_reference(q: jax.Array, w: PackedTernary) -> jax.Array:
    """The reference accumulator: unpack every level, int8 × int8 → int32 dot. ``[M, out]`` int32."""
    return int8_dot(q, unpack_levels(w))


def accumulate_f32(q: jax.Array, w: PackedTernary, dtype=jnp.float32) -> jax.Array:
    """Same accumulator through a float dot (``dtype`` inputs, float32 out), exact for D < 2^17."""
    y = lax.dot_general(q.astype(dtype), unpack_levels(w).astype(dtype), (((1,), (0,)), ((), ())),
                        preferred_element_type=jnp.float32)
    return y.astype(jnp.int32)


def kept_rows(q: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """Indices of the input features that are non-zero in any token, padded to ``rows`` with 0.

    Returns ``(idx int32 [rows], count int32 [])``. Rows past ``count`` point at feature 0 and
    are paired with zero activations by the caller, so they add nothing."""
    nz = jnp.any(q != 0, axis=0)
    (idx,) = jnp.nonzero(nz, size=rows, fill_value=0)
    return idx.astype(jnp.int32), jnp.sum(nz, dtype=jnp.int32)


def kept_rows_sorted(q: jax.Array, rows: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``kept_rows`` and ``gather_columns`` in one stable sort, for TPU: ``(idx, count, qg)``.

    The features' kept flags are the sort key; the feature indices and each token's activations ride
    along as values, so the kept features come first, ascending, with their columns. The first ``count``
    entries equal ``kept_rows``'s; past them come features no token keeps, whose activations are all zero,
    so ``qg`` needs no masking. On TPU this is one on-chip sort, where ``jnp.nonzero``'s scatter goes to
    the v5p SparseCore (XLA's cost model leaves it without a time and counts 34 MB for one 4096-wide row)
    and the column gather ``q[:, idx]`` is costed at ~10x the sort (benchmarks/RESULTS.md, decode)."""
    nz = jnp.any(q != 0, axis=0)
    out = jax.lax.sort((~nz, jnp.arange(q.shape[1], dtype=jnp.int32), *q), num_keys=1, is_stable=True)
    return out[1][:rows], jnp.sum(nz, dtype=jnp.int32), jnp.stack(out[2:])[:, :rows]


def gather_columns(q: jax.Array, idx: jax.Array, count: jax.Array) -> jax.Array:
    """``q[:, idx]`` with the padding columns (position ≥ count) zeroed: ``[M, rows]`` int8."""
    valid = jnp.arange(idx.shape[0]) < count
    return jnp.where(valid[None, :], jnp.take(q, idx, axis=1), jnp.zeros((), q.dtype))


def accumulate_gathered(q: jax.Array, w: PackedTernary, rows: int, dtype=jnp.float32) -> jax.Array:
    """Decode form: read only the packed rows of kept features, unpack them, dot. Exact accumulator.

    ``rows`` ≥ the number of features any token keeps (``min(D, M·k)``)."""
    idx, count = kept_rows(q, rows)
    qg = gather_columns(q, idx, count)
    sub = PackedTernary(jnp.take(w.data, idx, axis=0), w.scale, w.out_features, w.bits)
    if dtype == jnp.int8:
        return accumulate_reference(qg, sub)
    return accumulate_f32(qg, sub, dtype)


# --- the fastest CPU formulation found (benchmarks/RESULTS.md, "Kernels" section) --------------

def accumulate_chunked(q: jax.Array, w: PackedTernary, idx: jax.Array | None = None, count: jax.Array | None = None,
                       chunk: int = 128) -> jax.Array:
    """Exact accumulator ``[M, out]`` (int32) unpacking ``chunk`` packed columns at a time.

    XLA on CPU cannot fuse an unpack into its dot, and its int8 / bfloat16 dots are ~5× slower
    than float32. So a ``scan`` over column chunks unpacks ``[R, P·chunk]`` float32 levels (small
    enough to stay in cache) and feeds them to a float32 dot, exact for D < 2^17. With ``idx`` only
    those packed rows are read (decode: the kept rows, see ``kept_rows``; columns of ``q`` past
    ``count`` must be zero, ``gather_columns`` does that)."""
    if idx is not None:
        q = gather_columns(q, idx, count)
        data = jnp.take(w.data, idx, axis=0)
    else:
        data = w.data
    r, c = data.shape
    m = q.shape[0]
    n_chunks = -(-c // chunk)
    blocks = jnp.pad(data, ((0, 0), (0, n_chunks * chunk - c))).reshape(r, n_chunks, chunk).transpose(1, 0, 2)
    qf = q.astype(jnp.float32)

    def step(_, blk):
        t = jnp.concatenate([p.astype(jnp.float32) for p in unpack_planes(blk, w.bits)], axis=1)  # [R, P·chunk]
        return None, lax.dot_general(qf, t, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    _, out = lax.scan(step, None, blocks)  # [n_chunks, M, P·chunk], plane-major inside a chunk
    p = len(unpack_planes(data[:1, :1], w.bits))
    out = out.reshape(n_chunks, m, p, chunk).transpose(1, 2, 0, 3).reshape(m, p, n_chunks * chunk)[:, :, :c]
    return out.reshape(m, p * c)[:, : w.out_features].astype(jnp.int32)
