"""Triton (GPU) forms of the two int8 × packed-ternary kernels: accumulators in registers, masked edges.

Same contract as ``pallas.matmul`` / ``pallas.gather_matmul`` (the exact int32 accumulator, plane-major
``[P, M, C]``), written for what Pallas's Triton lowering does and does not do:

- it does not mask a block that runs past an array's edge, so every weight load carries an explicit
  mask (rows ≥ D, packed columns ≥ C: masked lanes are not read), and outputs are allocated padded to
  whole tiles and sliced by the caller;
- every loaded or stored array must have a power-of-2 size, so the ``P`` planes (5 for base-3 packing)
  are separate ``[bm, bc]`` accumulators, never one ``[P, bm, bc]`` block;
- a Triton program keeps values in registers across a loop, so the reduction over input features is a
  ``fori_loop`` inside the kernel and the output is written once (the generic kernels read and write
  their output tile in HBM at every reduction step, and their tiles exceed the H200's 227 KiB of
  shared memory per block: both seen on the first H200 run, benchmarks/RESULTS.md).

``gather_matmul`` (decode, few tokens) splits the kept rows of each column tile over ``splits``
programs so that a batch-1 decode, whose column tiles alone are a few dozen programs, fills the chip;
each split writes its partial int32 sums and XLA adds them (exact). A form that added them with atomic
adds into an aliased zeroed output was exact in the interpreter but wrong on the H200 (cause not
established; benchmarks/gather_diag.py, RESULTS.md), so it is not kept.

Both run in the Pallas interpreter too (``interpret=True``): the tests check them there on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .packing import unpack_planes

# Tiles: powers of 2 (Triton); bm × bc int32 per plane stays in registers (P ≤ 5 planes, 8 warps).
BM, BC, BK = 64, 64, 128
DECODE_BC, DECODE_BK = 64, 32
TARGET_PROGRAMS = 264  # ~2 per streaming multiprocessor of an H100 / H200 (132)
_PARAMS = dict(num_warps=8, num_stages=3)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


def _add_planes(accs, q, packed, bits):
    return tuple(a + jnp.dot(q, t, preferred_element_type=jnp.int32)
                 for a, t in zip(accs, unpack_planes(packed, bits)))


def _matmul_kernel(q_ref, w_ref, o_ref, *, bits, d, c, bk, nk):
    p, bm, bc = o_ref.shape
    col_ok = pl.program_id(1) * bc + lax.broadcasted_iota(jnp.int32, (1, bc), 1) < c

    def step(l, accs):
        row_ok = l * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0) < d
        w = pltriton.load(w_ref.at[pl.ds(l * bk, bk), :], mask=row_ok & col_ok, other=0)
        return _add_planes(accs, q_ref[:, pl.ds(l * bk, bk)], w, bits)

    accs = lax.fori_loop(0, nk, step, tuple(jnp.zeros((bm, bc), jnp.int32) for _ in range(p)))
    for i, a in enumerate(accs):
        o_ref[i] = a


def _gather_kernel(n_ref, idx_ref, q_ref, w_ref, o_ref, *, bits, c, bc, bk, per_split):
    p = 4 if bits == 2 else 5
    mp = q_ref.shape[0]  # this split's output block is [P·mp, bc] (planes stacked: a 2-D target)
    j, s = pl.program_id(0), pl.program_id(1)
    cols = lax.broadcasted_iota(jnp.int32, (1, bc), 1)
    col_ok = j * bc + cols < c
    n = n_ref[0]

    def step(l, accs):
        ok = l * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0) < n
        rows = idx_ref[pl.ds(l * bk, bk)][:, None]
        # two integer-array indices (not rows and a slice): the form both Triton and the interpreter take
        w = pltriton.load(w_ref.at[rows, cols], mask=ok & col_ok, other=0)  # skipped rows are not read
        return _add_planes(accs, q_ref[:, pl.ds(l * bk, bk)], w, bits)

    first = s * per_split
    last = jnp.minimum(first + per_split, pl.cdiv(n, bk))
    accs = lax.fori_loop(first, jnp.maximum(first, last), step,
                         tuple(jnp.zeros((mp, bc), jnp.int32) for _ in range(p)))
    for i, a in enumerate(accs):  # this split's partial sums, added by XLA afterwards
        o_ref[pl.ds(i * mp, mp), :] = a


def _cost(flops: int, nbytes: int) -> pl.CostEstimate:
    return pl.CostEstimate(flops=int(flops), transcendentals=0, bytes_accessed=int(nbytes))


@functools.partial(jax.jit, static_argnames=("bits", "bm", "bc", "bk", "interpret"))
def matmul(q, data, *, bits, bm=None, bc=BC, bk=BK, interpret=False):
    """Plane-major int32 ``[P, M, C]`` accumulator of int8 ``q [M, D]`` times packed ``data [D, C]``.

    Grid (M tiles, C tiles); each program loops over D in ``bk`` steps. ``bm`` default: M rounded up to
    a power of 2 in [16, 64]."""
    m, d = q.shape
    c = data.shape[1]
    p = 4 if bits == 2 else 5
    bm = bm or min(BM, _pow2_at_least(m, 16))
    mp, dp, cp = _round_up(m, bm), _round_up(d, bk), _round_up(c, bc)
    q = jnp.pad(q, ((0, mp - m), (0, dp - d)))
    grid = (mp // bm, cp // bc)
    out = pl.pallas_call(
        functools.partial(_matmul_kernel, bits=bits, d=d, c=c, bk=bk, nk=dp // bk),
        grid=grid,
        in_specs=[pl.BlockSpec((bm, dp), lambda i, j: (i, 0)),
                  pl.BlockSpec((d, bc), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((p, bm, bc), lambda i, j: (0, i, j)),
        out_shape=jax.ShapeDtypeStruct((p, mp, cp), jnp.int32),
        interpret=interpret, name="qsparse_int8_ternary_matmul_gpu",
        compiler_params=None if interpret else pltriton.CompilerParams(**_PARAMS),
        # q read once per column tile, the weight once per row tile, the output written once
        cost_estimate=_cost(2 * mp * dp * p * cp, grid[1] * mp * dp + grid[0] * d * c + p * mp * cp * 4),
    )(q, data)
    return out[:, :m, :c]


@functools.partial(jax.jit, static_argnames=("bits", "bc", "bk", "splits", "interpret"))
def gather_matmul(count, idx, qg, data, *, bits, bc=DECODE_BC, bk=DECODE_BK, splits=None, interpret=False):
    """Plane-major int32 ``[P, M, C]`` accumulator of ``qg [M, R]`` times the packed rows ``data[idx]``.

    Grid (C tiles, ``splits``); program ``(j, s)`` reads the ``s``-th share of the first ``count`` listed
    rows of column tile ``j`` (``bk`` per step, masked past ``count``) and writes its partial sums; XLA
    adds the splits. ``splits`` default: enough programs for ~2 per multiprocessor."""
    m, r = qg.shape
    d, c = data.shape
    p = 4 if bits == 2 else 5
    mp = _pow2_at_least(m, 16)  # Triton: a dot needs 16 rows, an array a power-of-2 size
    bk = min(bk, _pow2_at_least(r, 16))
    rp, cp = _round_up(r, bk), _round_up(c, bc)
    chunks, tiles = rp // bk, cp // bc
    splits = max(1, min(chunks, splits or -(-TARGET_PROGRAMS // tiles)))
    per_split = -(-chunks // splits)
    qg = jnp.pad(qg, ((0, mp - m), (0, rp - r)))
    idx = jnp.pad(idx, (0, rp - r))
    out = pl.pallas_call(
        functools.partial(_gather_kernel, bits=bits, c=c, bc=bc, bk=bk, per_split=per_split),
        grid=(tiles, splits),
        in_specs=[pl.BlockSpec((1,), lambda j, s: (0,)),
                  pl.BlockSpec((rp,), lambda j, s: (0,)),
                  pl.BlockSpec((mp, rp), lambda j, s: (0, 0)),
                  pl.BlockSpec((d, bc), lambda j, s: (0, j))],  # rows are picked inside the kernel
        out_specs=pl.BlockSpec((None, p * mp, bc), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((splits, p * mp, cp), jnp.int32),
        interpret=interpret, name="qsparse_gather_ternary_matmul_gpu",
        compiler_params=None if interpret else pltriton.CompilerParams(**_PARAMS),
        # at most every listed row of every column tile, its activations once per tile, each split's sums once
        cost_estimate=_cost(2 * mp * rp * p * cp, r * c + tiles * mp * rp + splits * p * mp * cp * 4),
    )(count, idx, qg, data)
    return out.sum(axis=0).reshape(p, mp, cp)[:, :m, :c]
