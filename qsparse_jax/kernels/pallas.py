"""Pallas kernels for the int8 × packed-ternary matmul (TPU Mosaic, GPU Triton, or interpret mode).

Both kernels produce the exact int32 accumulator ``acc[M, out] = Σ_i q[m, i] · t[i, n]``; the two
scales are applied afterwards by ``reference.scale_output`` (one fused element-wise op). Output is
written plane-major, ``[P, M, C]`` (P ternary values per byte, C packed columns, see ``packing``):
plane ``p`` of a packed tile is a contiguous slice of output columns, so a tile unpacks with shifts
and needs no lane interleave; ``planes_to_columns`` turns it into ``[M, out]``.

- ``matmul``: batched / prefill. Grid (M tiles, C tiles, D tiles), the D axis is the reduction.
  Block Q-Sparse inputs use it unchanged (their zeros are just zeros in ``q``).
- ``gather_matmul``: decode (few tokens). Only the packed rows listed in ``idx`` (the features kept
  by any token) are read: each step gathers ``bk`` rows of a column tile (Triton: a gather load, so
  skipped rows are never read), multiplies by the matching int8 activations and accumulates.
  Steps past ``count`` kept rows do nothing. GPU (Triton) only: Mosaic has no vector gather from a
  ref, so on TPU decode runs ``matmul`` (all rows; a per-row-DMA TPU kernel is future work).

On GPU (``target="gpu"``) both hand over to ``pallas_gpu``, their Triton forms (register accumulators,
masked edges, power-of-2 arrays: the generic bodies below break two Triton rules, see there). The
generic kernels are the TPU (Mosaic) and interpret-mode forms; both lower on a CPU host for TPU, the
GPU forms for CUDA, which the tests check.

Each kernel zeroes its output tile at the first reduction step and accumulates into it; a tile that
is never visited keeps whatever the output buffer held, which the tests poison (``out_init``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import pallas_gpu
from .packing import unpack_planes


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def planes_to_columns(acc: jax.Array, out_features: int) -> jax.Array:
    """``[P, M, C]`` plane-major accumulator → ``[M, out]`` (column ``p·C + c``)."""
    p, m, c = acc.shape
    return jnp.transpose(acc, (1, 0, 2)).reshape(m, p * c)[:, :out_features]


def _accumulate_planes(o_ref, q, packed, bits):
    for p, t in enumerate(unpack_planes(packed, bits)):
        o_ref[p] += jnp.dot(q, t, preferred_element_type=jnp.int32)


def _matmul_step(first, q_ref, w_ref, *rest, bits):
    """One (M, C, D) grid step; ``first``: first step of the reduction over D."""
    o_ref = rest[-1]  # an aliased out_init (poisoning in tests) comes before it and is not read

    @pl.when(first)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    _accumulate_planes(o_ref, q_ref[...], w_ref[...], bits)


def _matmul_kernel(*refs, bits):
    # program ids are read at the top level: the interpreter cannot evaluate them inside pl.when
    _matmul_step(pl.program_id(2) == 0, *refs, bits=bits)


def _gather_kernel(n_ref, idx_ref, q_ref, w_ref, *rest, bits, bk):
    o_ref = rest[-1]
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    @pl.when(j * bk < n_ref[0])  # chunks made only of padding rows read nothing
    def _():
        rows = idx_ref[pl.ds(j * bk, bk)]
        _accumulate_planes(o_ref, q_ref[...], w_ref[rows, :], bits)


def _gpu_only_plain(kernel, out_init):
    if kernel is not None or out_init is not None:
        raise ValueError("kernel= and out_init= apply to the generic (TPU / interpret) kernels, not target='gpu'")


def _compiler_params(target, semantics):
    """Mosaic's on TPU; none in interpret mode (GPU calls go to ``pallas_gpu``)."""
    if target == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=semantics)
    return None


def _call(kernel, grid, in_specs, out_spec, out_shape, args, out_init, interpret, name, target, semantics):
    aliases = {}
    if out_init is not None:
        if out_init.shape != out_shape.shape or out_init.dtype != out_shape.dtype:
            raise ValueError(f"out_init must be {out_shape.dtype}{list(out_shape.shape)}, got {out_init.dtype}{list(out_init.shape)}")
        aliases = {len(args): 0}
        args = (*args, out_init)
        in_specs = [*in_specs, pl.BlockSpec(memory_space=pl.ANY)]
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_spec, out_shape=out_shape,
                          input_output_aliases=aliases, interpret=interpret, name=name,
                          compiler_params=None if interpret else _compiler_params(target, semantics))(*args)


@functools.partial(jax.jit, static_argnames=("bits", "bm", "bc", "bk", "interpret", "kernel", "target"))
def matmul(q, data, *, bits, bm=None, bc=128, bk=512, interpret=False, out_init=None, kernel=None, target=None):
    """Plane-major int32 ``[P, M, C]`` accumulator of int8 ``q [M, D]`` times packed ``data [D, C]``.

    Tiles: ``bm`` tokens (default: M rounded up to 16, at most 128), ``bc`` packed columns
    (= P·bc output columns), ``bk`` input features. Edges: q is zero-padded to whole tiles (small);
    the weight is not copied — its edge tiles may hold anything, which multiplies zeros (integers,
    so exactly 0). ``kernel`` replaces the kernel body (tests use it to break the kernel on purpose).
    ``target``: ``"gpu"`` (``pallas_gpu.matmul``, its own tiles) / ``"tpu"`` (default: the default backend)."""
    target = target or jax.default_backend()
    if target == "gpu":
        _gpu_only_plain(kernel, out_init)
        return pallas_gpu.matmul(q, data, bits=bits, interpret=interpret)
    m, d = q.shape
    c = data.shape[1]
    p = 4 if bits == 2 else 5
    bm = bm or min(128, _round_up(m, 16))
    bk = min(bk, _round_up(d, 128))
    bc = min(bc, c) if c < 128 else bc
    mp, dp = _round_up(m, bm), _round_up(d, bk)
    q = jnp.pad(q, ((0, mp - m), (0, dp - d)))
    grid = (mp // bm, pl.cdiv(c, bc), dp // bk)
    in_specs = [pl.BlockSpec((bm, bk), lambda i, j, l: (i, l)),
                pl.BlockSpec((bk, bc), lambda i, j, l: (l, j))]
    out_spec = pl.BlockSpec((p, bm, bc), lambda i, j, l: (0, i, j))
    out_shape = jax.ShapeDtypeStruct((p, mp, c), jnp.int32)
    body = functools.partial(kernel or _matmul_kernel, bits=bits)
    out = _call(body, grid, in_specs, out_spec, out_shape, (q, data), out_init, interpret, "qsparse_int8_ternary_matmul",
                target, ("parallel", "parallel", "arbitrary"))
    return out[:, :m]


@functools.partial(jax.jit, static_argnames=("bits", "bc", "bk", "interpret", "kernel", "target"))
def gather_matmul(count, idx, qg, data, *, bits, bc=128, bk=64, interpret=False, out_init=None, kernel=None,
                  target=None):
    """Plane-major int32 ``[P, M, C]`` accumulator of ``qg [M, R]`` times the packed rows ``data[idx]``.

    ``idx`` int32 ``[R]`` lists the rows to read (first ``count`` valid; ``qg`` columns past ``count``
    are zero), ``count`` int32 ``[1]``. Only those rows of ``data [D, C]`` are loaded, ``bk`` per step.
    ``target="gpu"``: ``pallas_gpu.gather_matmul``."""
    target = target or jax.default_backend()
    if target == "gpu":
        _gpu_only_plain(kernel, out_init)
        return pallas_gpu.gather_matmul(count, idx, qg, data, bits=bits, interpret=interpret)
    m, r = qg.shape
    d, c = data.shape
    p = 4 if bits == 2 else 5
    mp = _round_up(m, 16)  # Triton's dot needs 16 rows
    bk = min(bk, _round_up(r, 16))
    bc = min(bc, c) if c < 128 else bc
    rp = _round_up(r, bk)
    qg = jnp.pad(qg, ((0, mp - m), (0, rp - r)))
    idx = jnp.pad(idx, (0, rp - r))
    grid = (pl.cdiv(c, bc), rp // bk)
    in_specs = [pl.BlockSpec((1,), lambda j, l: (0,)),
                pl.BlockSpec((rp,), lambda j, l: (0,)),
                pl.BlockSpec((mp, bk), lambda j, l: (0, l)),
                # the whole height of a column tile: rows are picked inside the kernel
                pl.BlockSpec((d, bc), lambda j, l: (0, j))]
    out_spec = pl.BlockSpec((p, mp, bc), lambda j, l: (0, 0, j))
    out_shape = jax.ShapeDtypeStruct((p, mp, c), jnp.int32)
    body = functools.partial(kernel or _gather_kernel, bits=bits, bk=bk)
    out = _call(body, grid, in_specs, out_spec, out_shape, (count, idx, qg, data), out_init, interpret,
                "qsparse_gather_ternary_matmul", target, ("parallel", "arbitrary"))
    return out[:, :m]
