"""Top-K activation sparsification with a straight-through estimator.

Q-Sparse (arXiv 2407.10969, §2): ``Y = (X ⊙ M) Wᵀ`` (Eq. 2) with ``M = Top_k(|X|)`` (Eq. 3), per token
along the input-feature (last) axis. Backward is the straight-through estimator
``∂Y/∂X = ∂Y/∂(X⊙M)`` (Eq. 13); the vanilla masked gradient ``∂Y/∂(X⊙M) ⊙ M`` (Eq. 12) is kept for the
ablation. Block Q-Sparse applies the same selection in every block of ``M`` consecutive features (N:M).

Selection does not sort. ``|x|`` is non-negative, so its IEEE bit pattern read as an integer orders
exactly like the value (a 16-bit float keeps its 16-bit pattern: 2^15 candidates, not float32's 2^31);
a per-row ``W``-ary search over that integer finds the k-th largest magnitude: each pass counts, in
one read of the row, the entries at or above ``W − 1`` candidate thresholds and keeps the sub-range
holding the k-th, so 31 bits take 8 passes at ``W = 16`` instead of binary search's 31, and bf16's 15
bits 8 passes at ``W = 4`` (``W`` by the platform compiled for and the row count: ``FEW_ROWS``). Plain
reductions, so it also works when the feature axis is sharded, where ``lax.top_k`` does not. On a GPU
each pass is a kernel launch plus a read of the activations: the 31 float32 passes cost 0.4–1.0 ms per
projection on an H200 (benchmarks/RESULTS.md). Short N:M blocks
(≤ 64) instead rank every entry against its block in one pass. Ties at the threshold are broken
towards the lowest index so that exactly ``k`` entries are kept.
"""

from __future__ import annotations

from functools import partial
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

GRADS = ("ste", "masked")
SELECTS = ("auto", "xla", "fused", "statistical")  # exact (fused kernel where one applies / XLA search / fused kernel required), approximate
RESCALES = ("none", "l2_preserve")
_FLOAT_COUNT_MIN = 128  # row length from which counting in float32 is faster (see _rows_topk_mask)


def keep_count(dim: int, sparsity: float) -> int:
    """Number of entries kept out of ``dim``: ``k = int((1 - sparsity) · dim)`` (authors' code)."""
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    k = int((1.0 - float(sparsity)) * dim)
    if k < 1:
        raise ValueError(f"sparsity {sparsity} keeps no entry out of {dim}; allowed: sparsity < {1 - 1 / dim:.6g}")
    return k


WAYS = 16  # sub-ranges per search pass for decode's few rows on accelerators: ceil(31 / log2(16)) = 8 passes
FEW_ROWS = 64  # at most this many rows (decode): WAYS on accelerators, binary on CPU, where the 15 compares
# per entry cost more than re-reading the row (2048×1024, k = 716, 2 cores: 20 ms at 2 ways, 59 at 4, 81
# at 8, 116 at 16). More rows (training, prefill): binary on CPU and GPU — on an H200, 16 vs 2 ways took
# 0.54× the time at 1×4096 and 0.52× at 8×11008 but 1.24× at 8192×4096, and a 7B-shape train step 8.3×
# dense instead of 2.2× (benchmarks/RESULTS.md): with many rows the compares, not the passes, are the
# cost — and 4 ways on TPU, where the compiled v5p train step is bound by the passes' HBM reads
# (benchmarks/RESULTS.md, "top-K passes").
FEW_ROWS_WAYS = {"cpu": 2, "default": WAYS}
MANY_ROWS_WAYS = {"tpu": 4, "default": 2}


def _magnitude_bits(x: jax.Array) -> tuple[jax.Array, int]:
    """``|x|``'s IEEE bit pattern as int32, which orders exactly like ``|x|``, and the pattern of +inf.

    16-bit floats (bf16, f16) keep their own 16-bit pattern: the search then spans 2^15 values (15
    binary passes) instead of float32's 2^31, and selects exactly the same entries (widening is exact)."""
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize == 2:
        inf = int(np.array(np.inf, x.dtype).view(np.int16))
        return lax.bitcast_convert_type(jnp.abs(x), jnp.int16).astype(jnp.int32), inf
    return lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.int32), 0x7F800000


def _passes(width: int, ways: int) -> int:
    n = 0
    while width > 1:
        width, n = -(-width // ways), n + 1
    return n


def _search(count_ok, lo, hi, width: int, ways: int | dict[str, int]):
    """Largest t in [lo, hi) with ``ok(t)`` true, per row, where ``ok`` is true at ``lo`` and monotone
    (true below some point, false above); ``width`` bounds ``hi − lo`` statically. ``count_ok(ts)``
    takes candidates ``[..., W]`` and returns how many of them are ok (``[..., 1]``): one pass over the
    data for all ``W``. Each pass cuts the range into ``ways`` near-equal parts."""
    if isinstance(ways, dict):  # by the platform the program is compiled for (not the host's default backend)
        branches = {p: (lambda lo, hi, w=w: _search(count_ok, lo, hi, width, w)) for p, w in ways.items()}
        return lax.platform_dependent(lo, hi, **branches)
    j = jnp.arange(1, ways, dtype=jnp.int32)

    def body(_, carry):
        lo, hi = carry
        w = hi - lo
        # lo + ⌊w·j/ways⌋ without overflowing int32: (w // ways)·j + ((w % ways)·j) // ways
        cand = lo + (w // ways) * j + ((w % ways) * j) // ways  # ascending in j
        n = count_ok(cand)  # candidates ok: the first n
        below = jnp.take_along_axis(cand, jnp.maximum(n - 1, 0), axis=-1)
        above = jnp.take_along_axis(cand, jnp.minimum(n, ways - 2), axis=-1)
        return jnp.where(n > 0, below, lo), jnp.where(n < ways - 1, above, hi)

    lo, _ = lax.fori_loop(0, _passes(width, ways), body, (lo, hi))
    return lo


CPU_ROW_SPLITS = 2  # searches over this many row groups, compiled for CPU in a one-device process: _rows_topk_mask
CPU_SPLIT_MIN_ROWS = 256


def _rows_topk_mask(x: jax.Array, k: int, values_only: bool = False, ways: int | None = None) -> jax.Array:
    """Exact top-k-by-magnitude mask along the last axis, lowest index first among ties.

    ``values_only``: the caller only uses ``where(mask, x, 0)``, so rows whose ties are zeros (ReLU²
    outputs with fewer than k non-zeros) may keep all of them: same values, no tie-break pass.

    Compiled for CPU in a one-device process, many rows are searched in ``CPU_ROW_SPLITS`` independent
    groups: XLA:CPU runs independent loops concurrently, and the search's loop is otherwise one thread
    while the matmuls use every core (the 2048×1024 → 4096 top-K layer, fwd + bwd, on 2 cores, an
    interleaved A/B of 5 repeats: mean 1.102× dense in one group, 1.045× in two; benchmarks/RESULTS.md).
    The same rows, the same mask."""
    d = x.shape[-1]
    if k >= d:
        return jnp.ones(x.shape, bool)
    if (ways is None and x.ndim >= 2 and x.shape[0] % CPU_ROW_SPLITS == 0 and x.size // d >= CPU_SPLIT_MIN_ROWS
            and jax.device_count() == 1 and jax.sharding.get_abstract_mesh().empty):  # no sharded rows to split
        whole = lambda x: _rows_search(x, k, values_only, None)
        groups = lambda x: jnp.concatenate([whole(p) for p in jnp.split(x, CPU_ROW_SPLITS)], axis=0)
        return lax.platform_dependent(x, cpu=groups, default=whole)
    return _rows_search(x, k, values_only, ways)


def _rows_search(x: jax.Array, k: int, values_only: bool, ways: int | None) -> jax.Array:
    """``_rows_topk_mask`` over all of ``x``'s rows at once."""
    d = x.shape[-1]
    if ways is None:
        ways = FEW_ROWS_WAYS if x.size // d <= FEW_ROWS else MANY_ROWS_WAYS
    bits, inf = _magnitude_bits(x)
    # long rows: a float32 count (exact below 2^24) vectorizes better on CPU than an int32 sum of
    # booleans (~30 % faster at d=1024); short rows (N:M blocks) are the other way round (~2x)
    if d >= _FLOAT_COUNT_MIN:
        count = lambda m, axis=-1: jnp.sum(jnp.where(m, 1.0, 0.0), axis=axis, keepdims=True)
    else:
        count = lambda m, axis=-1: jnp.sum(m, axis=axis, keepdims=True, dtype=jnp.int32)

    def count_ok(value, ok):
        """``count_ok(cands)`` for ``_search``: per candidate c (``[..., W]``), ok(#entries with
        ``value(c)``), all W counted in one pass over the row; returns how many candidates are ok."""
        return lambda c: jnp.sum(ok(count(value(c[..., None, :]), axis=-2)[..., 0, :]), axis=-1, keepdims=True,
                                 dtype=jnp.int32)

    def select(_):
        # threshold t = k-th largest bit pattern: largest t with #(bits >= t) >= k
        # bounds derived from `bits` so they carry its sharding (explicit-axis meshes require matching ones)
        hi = jnp.minimum(jnp.max(bits, axis=-1, keepdims=True), inf) + 1  # +inf at most (NaN bits are above)
        t = _search(count_ok(lambda c: bits[..., :, None] >= c, lambda n: n >= k), hi * 0, hi, inf + 1, ways)
        above = bits > t
        ties = bits == t
        need = k - count(above)

        def break_ties(_):
            # keep the first `need` ties (need >= 1 since t is the k-th largest): the last kept tie is
            # at the largest p with #(ties & idx < p) < need
            idx = bits * 0 + lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
            zero = hi * 0
            cut = _search(count_ok(lambda p: ties[..., :, None] & (idx[..., :, None] < p), lambda n: n < need),
                          zero, zero + d + 1, d + 1, ways)
            return above | (ties & (idx <= cut))

        excess = count(ties) > need
        if values_only:
            excess = excess & (t > 0)
        return lax.cond(jnp.any(excess), break_ties, lambda _: above | ties, None)

    if not values_only:
        return select(None)
    # ReLU² inputs often have at most k non-zeros in every row: then top-K changes no value
    nonzero = bits > 0
    return lax.cond(jnp.all(count(nonzero) <= k), lambda _: nonzero, select, None)


_RANK_MAX = 64  # blocks up to this size select by rank (one fused pass) instead of bisection (31 passes)


def _ranked_topk_mask(x: jax.Array, k: int) -> jax.Array:
    """Exact top-k by magnitude along a short last axis: entry i is kept when fewer than k entries
    precede it, ``#{j : |x_j| > |x_i|} + #{j < i : |x_j| = |x_i|} < k`` (ties to the lowest index).
    ``d²`` comparisons per row but a single pass over memory, which is what bounds N:M blocks on
    accelerators, where each of the bisection's 31 steps re-reads the activations."""
    d = x.shape[-1]
    bits = lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.int32)
    bi, bj = bits[..., :, None], bits[..., None, :]
    i = lax.broadcasted_iota(jnp.int32, (d, d), 0)
    j = lax.broadcasted_iota(jnp.int32, (d, d), 1)
    before = (bj > bi) | ((bj == bi) & (j < i))
    return jnp.sum(before, axis=-1, dtype=jnp.int32) < k


def topk_mask(x: jax.Array, k: int, *, block_size: int | None = None, _values_only: bool = False) -> jax.Array:
    """Boolean mask ``M = Top_k(|x|)`` (Eq. 3) over the last axis, or per block of ``block_size`` (N:M)."""
    _check(x, k, block_size)
    if block_size is None:
        return _rows_topk_mask(x, k, _values_only)
    blocks = x.reshape(x.shape[:-1] + (x.shape[-1] // block_size, block_size))
    if block_size <= _RANK_MAX:  # 2.6x faster than bisection for 16:32 on CPU too
        return _ranked_topk_mask(blocks, k).reshape(x.shape)
    return _rows_topk_mask(blocks, k, _values_only).reshape(x.shape)


def _check(x, k, block_size):
    d = x.shape[-1] if x.ndim else 0
    if block_size is not None:
        if not isinstance(block_size, int) or block_size < 1 or d % block_size:
            raise ValueError(f"block_size must be a positive divisor of the feature size {d}, got {block_size!r}")
        d = block_size
    if not isinstance(k, int) or not 1 <= k <= d:
        raise ValueError(f"k must be an integer in [1, {d}] (entries kept per {'block' if block_size else 'row'}), got {k!r}")


def _forward(x, k, block_size, rescale, grad):
    # the STE backward never looks at the mask, so zero ties need not be broken
    mask = topk_mask(x, k, block_size=block_size, _values_only=grad == "ste")
    y = jnp.where(mask, x, jnp.zeros((), x.dtype))
    scale = None
    if rescale == "l2_preserve":
        x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
        full = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
        kept = jnp.sqrt(jnp.sum(y32 * y32, axis=-1, keepdims=True))
        scale = jnp.where(kept > 0, full / jnp.where(kept > 0, kept, 1.0), 1.0)
        y = (y32 * scale).astype(x.dtype)
    return y, mask, scale


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _topk_sparsify(x, k, block_size, rescale, grad):
    return _forward(x, k, block_size, rescale, grad)[0]


def _topk_fwd(x, k, block_size, rescale, grad):
    y, mask, scale = _forward(x, k, block_size, rescale, grad)
    # the STE needs nothing saved; the masked gradient needs the mask (and the rescale factor)
    return y, ((mask, scale) if grad == "masked" else None)


def _topk_bwd(k, block_size, rescale, grad, res, g):
    if grad == "ste":
        return (g,)  # Eq. 13: the cotangent passes through unmasked
    mask, scale = res
    g = jnp.where(mask, g, jnp.zeros((), g.dtype))  # Eq. 12
    if scale is not None:
        g = (g.astype(jnp.float32) * scale).astype(g.dtype)
    return (g,)


_topk_sparsify.defvjp(_topk_fwd, _topk_bwd)


def statistical_mask(x: jax.Array, k: int) -> jax.Array:
    """Approximate ``Top_k(|x|)`` by a per-row threshold from two reductions, no search (statistical
    top-K: Spark Transformer, arXiv 2506.06644; Gemma 3n). Spark Transformer keeps the signed entries
    above ``mean + std · Φ⁻¹(1 − k/d)``, the quantile of a normal with the row's moments; Q-Sparse
    selects by magnitude, so here ``|x| ≥ std · Φ⁻¹(1 − k/(2d))``: for a centred normal row exactly a
    fraction ``k/d`` of ``|x|`` lies above it (``std`` about the row mean). Other rows (ReLU² outputs
    are non-negative and heavy-tailed) keep more or fewer than ``k``: studies/select measures it."""
    d = x.shape[-1]
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    std = jnp.sqrt(jnp.maximum(jnp.mean(x32 * x32, axis=-1, keepdims=True) - mean * mean, 0.0))
    if k >= d:
        return jnp.ones(x.shape, bool)
    z = NormalDist().inv_cdf(1.0 - k / (2.0 * d))  # a Python float: traced code must not compute it
    return jnp.abs(x32) >= std * z


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _statistical_sparsify(x, k):
    return jnp.where(statistical_mask(x, k), x, jnp.zeros((), x.dtype))


_statistical_sparsify.defvjp(lambda x, k: (_statistical_sparsify(x, k), None), lambda k, _, g: (g,))  # STE


def topk_sparsify(x: jax.Array, k: int, *, block_size: int | None = None, rescale: str = "none",
                  grad: str = "ste", select: str = "xla") -> jax.Array:
    """``X ⊙ Top_k(|X|)`` per row of the last axis (Eq. 2–3), or per block of ``block_size`` (N:M).

    rescale: ``"none"`` (authors' code) or ``"l2_preserve"``: kept entries times ‖x‖/‖x ⊙ M‖ per row.
    grad: ``"ste"`` (Eq. 13, identity) or ``"masked"`` (Eq. 12, cotangent ⊙ M, times the rescale factor).
    select: ``"xla"``/``"auto"`` the exact search here (``auto`` means the fused kernel where the caller
    has one, ``fused`` that it must have one: ``nn/selection.py``), ``"statistical"`` the approximate
    threshold (``statistical_mask``).
    """
    if rescale not in RESCALES:
        raise ValueError(f"rescale must be one of {RESCALES}, got {rescale!r}")
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")
    if select not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, got {select!r}")
    if select == "fused":  # a kernel: nn.selection.select_topk runs it; here it would silently be the XLA search
        raise ValueError("select='fused' needs a fused kernel: call nn.selection.select_topk; here auto, xla or statistical")
    _check(x, k, block_size)
    if select == "statistical":
        if block_size is not None or rescale != "none" or grad != "ste":
            raise ValueError("select='statistical' goes with whole rows (no block_size), rescale='none', grad='ste'")
        return _statistical_sparsify(x, k)
    return _topk_sparsify(x, k, block_size, rescale, grad)

