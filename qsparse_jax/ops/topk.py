"""Top-K activation sparsification with a straight-through estimator.

Q-Sparse (arXiv 2407.10969, §2): ``Y = (X ⊙ M) Wᵀ`` (Eq. 2) with ``M = Top_k(|X|)`` (Eq. 3), per token
along the input-feature (last) axis. Backward is the straight-through estimator
``∂Y/∂X = ∂Y/∂(X⊙M)`` (Eq. 13); the vanilla masked gradient ``∂Y/∂(X⊙M) ⊙ M`` (Eq. 12) is kept for the
ablation. Block Q-Sparse applies the same selection in every block of ``M`` consecutive features (N:M).

Selection does not sort. ``|x|`` as a float32 is non-negative, so its IEEE bit pattern read as int32
orders exactly like the value; a per-row ``WAYS``-ary search over that integer finds the k-th largest
magnitude: each pass counts, in one read of the row, the entries at or above ``WAYS − 1`` candidate
thresholds and keeps the sub-range holding the k-th, so 31 bits take 8 passes at ``WAYS = 16``
instead of binary search's 31 (used for decode's few rows on accelerators; see ``FEW_ROWS``) (plain reductions, so it also works when the feature axis is sharded,
where ``lax.top_k`` does not). On a GPU each pass is a kernel launch plus a read of the activations:
the 31 passes cost 0.4–1.0 ms per projection on an H200 (benchmarks/RESULTS.md). Short N:M blocks
(≤ 64) instead rank every entry against its block in one pass. Ties at the threshold are broken
towards the lowest index so that exactly ``k`` entries are kept.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

GRADS = ("ste", "masked")
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


WAYS = 16  # sub-ranges per search pass on accelerators: ceil(31 / log2(16)) = 8 passes over the row
CPU_WAYS = 2  # binary search on CPU, where the 15 compares per entry cost more than re-reading the row:
# 2048×1024 rows, k = 716, 2 cores: 20 ms at 2 ways, 59 at 4, 81 at 8, 116 at 16 (interleaved medians)
FEW_ROWS = 64  # the wide search only for at most this many rows (decode); more rows: binary everywhere.
# H200, 16 vs 2 ways: 0.54× the time at 1×4096 and 0.52× at 8×11008, but 1.24× at 8192×4096, and a
# 7B-shape train step took 8.3× dense instead of 2.2× (benchmarks/RESULTS.md): with many rows the
# 15 compares per entry, not the passes, are the cost.


def _passes(width: int, ways: int) -> int:
    n = 0
    while width > 1:
        width, n = -(-width // ways), n + 1
    return n


def _search(count_ok, lo, hi, width: int, ways: int | None):
    """Largest t in [lo, hi) with ``ok(t)`` true, per row, where ``ok`` is true at ``lo`` and monotone
    (true below some point, false above); ``width`` bounds ``hi − lo`` statically. ``count_ok(ts)``
    takes candidates ``[..., W]`` and returns how many of them are ok (``[..., 1]``): one pass over the
    data for all ``W``. Each pass cuts the range into ``ways`` near-equal parts."""
    if ways is None:  # by the platform the program is compiled for (not the host's default backend)
        return lax.platform_dependent(lo, hi, cpu=lambda lo, hi: _search(count_ok, lo, hi, width, CPU_WAYS),
                                      default=lambda lo, hi: _search(count_ok, lo, hi, width, WAYS))
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


def _rows_topk_mask(x: jax.Array, k: int, values_only: bool = False, ways: int | None = None) -> jax.Array:
    """Exact top-k-by-magnitude mask along the last axis, lowest index first among ties.

    ``values_only``: the caller only uses ``where(mask, x, 0)``, so rows whose ties are zeros (ReLU²
    outputs with fewer than k non-zeros) may keep all of them: same values, no tie-break pass."""
    d = x.shape[-1]
    if k >= d:
        return jnp.ones(x.shape, bool)
    if ways is None and x.size // d > FEW_ROWS:
        ways = 2
    bits = lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.int32)
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
        hi = jnp.minimum(jnp.max(bits, axis=-1, keepdims=True), 0x7F800000) + 1  # +inf at most (NaN bits are above)
        t = _search(count_ok(lambda c: bits[..., :, None] >= c, lambda n: n >= k), hi * 0, hi, 0x7F800001, ways)
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


def topk_sparsify(x: jax.Array, k: int, *, block_size: int | None = None, rescale: str = "none",
                  grad: str = "ste") -> jax.Array:
    """``X ⊙ Top_k(|X|)`` per row of the last axis (Eq. 2–3), or per block of ``block_size`` (N:M).

    rescale: ``"none"`` (authors' code) or ``"l2_preserve"``: kept entries times ‖x‖/‖x ⊙ M‖ per row.
    grad: ``"ste"`` (Eq. 13, identity) or ``"masked"`` (Eq. 12, cotangent ⊙ M, times the rescale factor).
    """
    if rescale not in RESCALES:
        raise ValueError(f"rescale must be one of {RESCALES}, got {rescale!r}")
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")
    _check(x, k, block_size)
    return _topk_sparsify(x, k, block_size, rescale, grad)

