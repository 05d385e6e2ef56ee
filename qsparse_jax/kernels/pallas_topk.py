"""Fused top-K selection: ``x ⊙ Top_k(|x|)`` per row, or per block of M (N:M), in one Pallas kernel (TPU Mosaic, or interpret mode).

The XLA path (``ops/topk.py``) runs its threshold search as a loop of passes, each re-reading the
activations from HBM (31 for float32, 15 for bf16, plus a tie-break search). Here a block of rows is
copied into VMEM once, the whole exact search runs there, and the selected values are written once:
one HBM read of ``x`` and one write of ``y``, whatever the number of passes.

Same selection as ``ops.topk.topk_mask``: exactly ``k`` entries per row, the largest magnitudes, ties
broken towards the lowest index. In the kernel, per block of ``block_rows`` rows:

1. ``bits`` = the IEEE pattern of ``|x|`` as int32 (bf16: its own 16 bits, widened exactly; other
   dtypes: float32's 31), which orders exactly like ``|x|``;
2. binary search for the k-th largest pattern ``t`` (largest ``t`` with ``#(bits ≥ t) ≥ k``):
   ``value_passes`` passes, each a compare and a row sum over the block in VMEM;
3. keep ``bits > t`` and the first ``k − #(bits > t)`` entries equal to ``t`` by index: a second
   binary search over the index (``index_passes``), always run (no branch in the kernel).

``cost_estimate`` (a Mosaic call is opaque to XLA's cost analysis): bytes = one read of ``x`` + one
write of ``y``; flops = 3 vector operations (compare, select, add) per entry per pass, counted as
FLOPs although they run on the vector unit, not the MXU (``topk_cost``).

Block Q-Sparse (``topk_blocks``, N:M with M ≤ 64): the XLA path (``ops.topk._ranked_topk_mask``) ranks
each entry against its block in one fused pass, but materializes the ``M``-wide comparisons (1.3x dense
bytes for 16:32 in a 7B step). The kernel computes the same rank in VMEM, ``rank_i = #{j : |x_j| > |x_i|}
+ #{j < i : |x_j| = |x_i|}`` over ``j`` in ``i``'s block, by ``M − 1`` lane rotations of the whole row: for
shift ``s`` an entry at block position ``p ≥ s`` meets ``j = i − s`` (``roll(bits, s)``, earlier in the
block), one at ``p < s`` meets ``j = i − s + M`` (``roll(bits, s − M)``, later). An entry is kept when its
rank is below ``N``: exactly N per block, the same entries as the XLA path. Declared cost: one read and
one write; 7 vector operations (two rotations, a select, two compares, an or, an add) per entry per shift.

GPU (``topk_rows_gpu``, Triton): the same exact search, one row per program, the row padded to a power of
2 *in registers* (Triton's arrays are powers of 2; loads and stores are masked at the row's end, padded lanes
get the pattern −1 and are never counted), so again one read and one write. Written and checked in the
Pallas interpreter and by lowering to Triton on a CPU host; not yet run on a GPU, so ``select=auto`` does
not take it: ``select=fused`` asks for it (``nn/selection.py``).

Rows need not divide the block: the grid covers ``ceil(rows / block_rows)`` blocks and the rows past
the end of the last one are computed on whatever the buffer holds and never written back. The
straight-through gradient (Eq. 13) is the caller's (``nn/selection.py``): the kernel is the forward.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

BLOCK_MAX = 64  # N:M blocks up to this size run in ``topk_blocks`` (M − 1 rotations each); as ops.topk's rank path
VMEM_BLOCK_BYTES = 1 << 20  # int32 bits of one block: 1 MiB (the block's live temporaries are a few of these)


def block_rows_for(d: int, rows: int) -> int:
    """Rows per block: a multiple of 16 (bf16 sublane tiling) with a ~1 MiB int32 block, at most 256."""
    br = max(16, min(256, (VMEM_BLOCK_BYTES // (4 * d)) // 16 * 16))
    return min(br, -(-rows // 16) * 16)


def value_passes(dtype) -> int:
    """Binary-search passes for the threshold: over 2^15 bf16 patterns or 2^31 float32 ones (+inf + 1)."""
    return 15 if jnp.dtype(dtype) == jnp.bfloat16 else 31


def index_passes(d: int) -> int:
    """Binary-search passes for the tie cut over the indices 0..d."""
    return max(1, math.ceil(math.log2(d + 1)))


def topk_cost(rows: int, d: int, dtype) -> pl.CostEstimate:
    """What ``topk_rows`` declares: one read and one write of ``x``; 3 vector ops per entry per pass."""
    passes = value_passes(dtype) + index_passes(d) + 2  # + the row max and the count of entries above t
    nbytes = rows * d * jnp.dtype(dtype).itemsize
    return pl.CostEstimate(flops=3 * passes * rows * d, transcendentals=0, bytes_accessed=2 * nbytes)


def _bisect(ok, lo, hi, passes: int):
    """Largest t in [lo, hi) with ``ok(t)`` per row (``ok(lo)`` true, monotone), in ``passes`` halvings."""

    def body(_, carry):
        lo, hi = carry
        mid = lo + lax.shift_right_logical(hi - lo, 1)
        good = ok(mid)
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid)

    return lax.fori_loop(0, passes, body, (lo, hi))[0]


def _magnitude(x, sixteen: bool):
    """``|x|``'s bit pattern as int32 and the pattern of +inf; a bf16 value widened to float32 has 16 zero
    low bits, so ``sixteen`` keeps its own 16-bit pattern, exactly."""
    bits = lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.int32)
    return (lax.shift_right_logical(bits, 16), 0x7F80) if sixteen else (bits, 0x7F800000)


def _kernel(x_ref, o_ref, *, k: int, sixteen: bool, vpasses: int, ipasses: int):
    x = x_ref[...]
    d = x.shape[-1]
    bits, inf = _magnitude(x, sixteen)
    o_ref[...] = jnp.where(_search(bits, k, d, inf, vpasses, ipasses), x, jnp.zeros((), x.dtype))


def _by_rows(kernel, x: jax.Array, br: int, params, cost: pl.CostEstimate, name: str, interpret: bool) -> jax.Array:
    """``kernel`` over the rows of ``x`` (leading axes flattened) in blocks of ``br`` whole rows; output like ``x``.
    Rows past the end of the last block are computed on whatever the buffer holds and never written back."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(x2.shape, x.dtype),
        grid=(pl.cdiv(x2.shape[0], br),),
        in_specs=[pl.BlockSpec((br, d), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((br, d), lambda i: (i, 0)),
        compiler_params=None if interpret else params,
        cost_estimate=cost,
        interpret=interpret,
        name=name,
    )(x2)
    return y.reshape(x.shape)


def blocks_cost(rows: int, d: int, m: int, dtype) -> pl.CostEstimate:
    """What ``topk_blocks`` declares: one read and one write of ``x``; 7 vector ops per entry per shift."""
    nbytes = rows * d * jnp.dtype(dtype).itemsize
    return pl.CostEstimate(flops=7 * (m - 1) * rows * d, transcendentals=0, bytes_accessed=2 * nbytes)


def _blocks_kernel(x_ref, o_ref, *, n: int, m: int):
    x = x_ref[...]
    d = x.shape[-1]
    bits = lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.int32)
    pos = lax.rem(lax.broadcasted_iota(jnp.int32, bits.shape, 1), m)  # position inside the block
    rank = jnp.zeros(bits.shape, jnp.int32)
    for s in range(1, m):  # static: M − 1 rotations, unrolled
        earlier = pos >= s  # the partner j = i − s lies in the same block, before i; else j = i − s + M, after i
        other = jnp.where(earlier, pltpu.roll(bits, s, 1), pltpu.roll(bits, d + s - m, 1))
        rank = rank + jnp.where((other > bits) | ((other == bits) & earlier), 1, 0)
    o_ref[...] = jnp.where(rank < n, x, jnp.zeros((), x.dtype))


@functools.partial(jax.jit, static_argnames=("n", "m", "block_rows", "interpret"))
def topk_blocks(x: jax.Array, n: int, m: int, block_rows: int | None = None, interpret: bool = False) -> jax.Array:
    """``x ⊙ Top_n(|x|)`` in every block of ``m`` consecutive features of the last axis (N:M), exactly
    ``n`` per block, ties to the lowest index (module docstring)."""
    d = x.shape[-1]
    if not (1 <= m <= BLOCK_MAX and d % m == 0 and 1 <= n <= m):
        raise ValueError(f"N:M needs 1 <= N <= M <= {BLOCK_MAX} and M dividing the feature size {d}, got {n}:{m}")
    rows = x.size // d
    return _by_rows(functools.partial(_blocks_kernel, n=n, m=m), x, block_rows or block_rows_for(d, rows),
                    pltpu.CompilerParams(dimension_semantics=("parallel",)), blocks_cost(rows, d, m, x.dtype),
                    "qsparse_topk_blocks", interpret)


def _search(bits, k: int, d: int, inf: int, vpasses: int, ipasses: int):
    """The kept entries of each row of ``bits`` (``|x|``'s patterns; −1 for padding): the k-th largest
    pattern ``t`` by bisection, then the first ``k − #(bits > t)`` ties by index (module docstring)."""
    count = lambda m: jnp.sum(jnp.where(m, 1.0, 0.0), axis=-1, keepdims=True)  # exact below 2^24
    hi = jnp.minimum(jnp.max(bits, axis=-1, keepdims=True), inf) + 1  # NaN patterns lie above +inf
    t = _bisect(lambda c: count(bits >= c) >= k, hi * 0, hi, vpasses)
    above, ties = bits > t, bits == t
    need = k - count(above)  # ≥ 1: t is the k-th largest
    idx = lax.broadcasted_iota(jnp.int32, bits.shape, 1)
    cut = _bisect(lambda p: count(ties & (idx < p)) < need, hi * 0, hi * 0 + d + 1, ipasses)
    return above | (ties & (idx <= cut))


def _gpu_kernel(x_ref, o_ref, *, k: int, d: int, dp: int, sixteen: bool, vpasses: int, ipasses: int):
    ok = lax.broadcasted_iota(jnp.int32, (1, dp), 1) < d
    x = pltriton.load(x_ref.at[:, pl.ds(0, dp)], mask=ok, other=0)
    bits, inf = _magnitude(x, sixteen)
    keep = _search(jnp.where(ok, bits, -1), k, d, inf, vpasses, ipasses)
    pltriton.store(o_ref.at[:, pl.ds(0, dp)], jnp.where(keep, x, jnp.zeros((), x.dtype)), mask=ok)


@functools.partial(jax.jit, static_argnames=("k", "num_warps", "interpret"))
def topk_rows_gpu(x: jax.Array, k: int, num_warps: int | None = None, interpret: bool = False) -> jax.Array:
    """``topk_rows`` for GPUs (Triton): one row per program, the row in registers (module docstring)."""
    d = x.shape[-1]
    if not 1 <= k <= d:
        raise ValueError(f"k must be in [1, {d}], got {k}")
    dp = 1 << (d - 1).bit_length()
    warps = num_warps or max(4, min(32, dp // 512))  # ~16 entries of the row per thread at most
    kernel = functools.partial(_gpu_kernel, k=k, d=d, dp=dp, sixteen=x.dtype == jnp.bfloat16,
                               vpasses=value_passes(x.dtype), ipasses=index_passes(d))
    return _by_rows(kernel, x, 1, pltriton.CompilerParams(num_warps=warps, num_stages=1),
                    topk_cost(x.size // d, d, x.dtype), "qsparse_topk_rows_gpu", interpret)


@functools.partial(jax.jit, static_argnames=("k", "block_rows", "interpret"))
def topk_rows(x: jax.Array, k: int, block_rows: int | None = None, interpret: bool = False) -> jax.Array:
    """``x ⊙ Top_k(|x|)`` along the last axis of ``x`` (any leading shape), exactly ``k`` per row."""
    d = x.shape[-1]
    if not 1 <= k <= d:
        raise ValueError(f"k must be in [1, {d}], got {k}")
    rows = x.size // d
    kernel = functools.partial(_kernel, k=k, sixteen=x.dtype == jnp.bfloat16, vpasses=value_passes(x.dtype),
                               ipasses=index_passes(d))
    return _by_rows(kernel, x, block_rows or block_rows_for(d, rows),
                    pltpu.CompilerParams(dimension_semantics=("parallel",)), topk_cost(rows, d, x.dtype),
                    "qsparse_topk_rows", interpret)
