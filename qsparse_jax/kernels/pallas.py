"""Pallas kernels for the int8 × packed-ternary matmul (TPU Mosaic, GPU Triton, or interpret mode).

Both kernels produce the exact int32 accumulator ``acc[M, out] = Σ_i q[m, i] · t[i, n]``; the two
scales are applied afterwards by ``reference.scale_output`` (one fused element-wise op). Output is
written plane-major, ``[J, M, C]`` (J ternary values per packed unit — 4 / 5 per byte, 16 / 20 per
uint32 word — and C packed columns, see ``packing``): plane ``j`` of a packed tile is a contiguous
slice of output columns, so a tile unpacks with shifts and needs no lane interleave;
``planes_to_columns`` turns it into ``[M, out]``.

- ``matmul``: batched / prefill. Grid (M tiles, C tiles, D tiles), the D axis is the reduction.
  Block Q-Sparse inputs use it unchanged (their zeros are just zeros in ``q``). Bytes or words.
- ``gather_matmul``: decode (few tokens). Only the packed rows listed in ``idx`` (the features kept
  by any token) are read. Here (interpret mode on a CPU host): each step gathers ``bk`` rows of a
  column tile from a ref, multiplies by the matching int8 activations and accumulates; steps past
  ``count`` kept rows do nothing. Mosaic has no vector gather from a ref, so on TPU
  (``target="tpu"``) it hands over to ``pallas_tpu_decode``, which copies each kept row by DMA and
  needs the words layout (``packing.tpu_layout``).

On GPU (``target="gpu"``) both hand over to ``pallas_gpu``, their Triton forms (register accumulators,
masked edges, power-of-2 arrays: the generic bodies below break two Triton rules, see there; bytes
only). The generic kernels are the TPU (Mosaic) and interpret-mode forms; both lower on a CPU host for
TPU, the GPU forms for CUDA, which the tests check.

No relayout copies around ``matmul`` on TPU: with packed columns a multiple of 128
(``packing.tpu_layout``) XLA keeps the weight row-major, as the kernel reads it, and the default
reduction tile divides D (512, 256 or 128; 11008 = 43 · 256), so the activations are not padded; nor
are they padded to whole token tiles (a block may run past M: those rows only reach output rows that
are sliced off).

Each kernel zeroes its output tile at the first reduction step and accumulates into it; a tile that
is never visited keeps whatever the output buffer held, which the tests poison (``out_init``). Each
declares a ``cost_estimate``: a Mosaic call is opaque to XLA's cost analysis, which otherwise counts
nothing for it (``matmul_bytes``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import pallas_gpu, pallas_tpu_decode
from .packing import planes, unpack_planes, words_to_bytes


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def planes_to_columns(acc: jax.Array, out_features: int) -> jax.Array:
    """``[J, M, C]`` plane-major accumulator → ``[M, out]`` (column ``j·C + c``)."""
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
    return pltpu.CompilerParams(dimension_semantics=semantics) if target == "tpu" else None


def _call(kernel, grid, in_specs, out_spec, out_shape, args, out_init, interpret, name, target, semantics, cost):
    aliases = {}
    if out_init is not None:
        if out_init.shape != out_shape.shape or out_init.dtype != out_shape.dtype:
            raise ValueError(f"out_init must be {out_shape.dtype}{list(out_shape.shape)}, got {out_init.dtype}{list(out_init.shape)}")
        aliases = {len(args): 0}
        args = (*args, out_init)
        in_specs = [*in_specs, pl.BlockSpec(memory_space=pl.ANY)]
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_spec, out_shape=out_shape,
                          input_output_aliases=aliases, interpret=interpret, name=name, cost_estimate=cost,
                          compiler_params=None if interpret else _compiler_params(target, semantics))(*args)


def reduction_tile(d: int, bk: int | None = None) -> int:
    """``bk`` if given, else the largest of 512 / 256 / 128 dividing ``D`` (no padding of the activations),
    else 512 (or ``D`` rounded up to 128 when smaller)."""
    if bk:
        return min(bk, _round_up(d, 128))
    return next((t for t in (512, 256, 128) if d % t == 0), min(512, _round_up(d, 128)))


def _tiles(m, d, c, bm, bc, bk):
    bm = bm or min(128, _round_up(m, 16))
    bc = min(bc, c) if c < 128 else bc
    return bm, bc, reduction_tile(d, bk)


def matmul_bytes(m: int, d: int, c: int, unit_bytes: int = 1, bits: float = 2, *, bm=None, bc=128,
                 bk=None) -> dict[str, int]:
    """HBM bytes ``matmul`` moves with these tiles (its ``cost_estimate``), from its block specs: the
    int8 activation tile changes at every step, so ``q`` is read once per column tile; the weight once
    per token tile; the int32 output tile stays put over the reduction and is written once. Edge tiles
    count their in-bounds part. ``flops``: what the tiles execute, 2 per product, padding included."""
    bm, bc, bk = _tiles(m, d, c, bm, bc, bk)
    nm, nc, dp = pl.cdiv(m, bm), pl.cdiv(c, bc), _round_up(d, bk)
    j = planes(jnp.uint8 if unit_bytes == 1 else jnp.uint32, bits)
    out = {"activations": nc * m * dp, "weight": nm * d * c * unit_bytes, "output": j * nm * bm * c * 4}
    out["total"] = sum(out.values())
    out["flops"] = 2 * nm * bm * dp * j * nc * bc
    return out


@functools.partial(jax.jit, static_argnames=("bits", "bm", "bc", "bk", "interpret", "kernel", "target"))
def matmul(q, data, *, bits, bm=None, bc=128, bk=None, interpret=False, out_init=None, kernel=None, target=None):
    """Plane-major int32 ``[J, M, C]`` accumulator of int8 ``q [M, D]`` times packed ``data [D, C]``.

    Tiles: ``bm`` tokens (default: M rounded up to 16, at most 128), ``bc`` packed units (= J·bc output
    columns), ``bk`` input features (default ``reduction_tile``). Edges: q is zero-padded to whole
    ``bk`` tiles only where ``bk`` does not divide D (the default tile does for 7B shapes); token tiles
    may run past M (those rows reach only output rows that are dropped); the weight is not copied — its
    edge tiles may hold anything, which multiplies zeros (integers, so exactly 0). ``kernel`` replaces
    the kernel body (tests use it to break the kernel on purpose). ``target``: ``"gpu"``
    (``pallas_gpu.matmul``, its own tiles; it reads bytes, so words are converted first, a copy) /
    ``"tpu"`` (default: the default backend)."""
    target = target or jax.default_backend()
    if target == "gpu":
        _gpu_only_plain(kernel, out_init)  # the Triton kernel reads bytes: words are converted (a copy)
        return pallas_gpu.matmul(q, words_to_bytes(data, bits), bits=bits, interpret=interpret)
    m, d = q.shape
    c = data.shape[1]
    p = planes(data.dtype, bits)
    bm, bc, bk = _tiles(m, d, c, bm, bc, bk)
    mp, dp = _round_up(m, bm), _round_up(d, bk)
    if dp != d:
        q = jnp.pad(q, ((0, 0), (0, dp - d)))
    grid = (mp // bm, pl.cdiv(c, bc), dp // bk)
    in_specs = [pl.BlockSpec((bm, bk), lambda i, j, l: (i, l)),
                pl.BlockSpec((bk, bc), lambda i, j, l: (l, j))]
    out_spec = pl.BlockSpec((p, bm, bc), lambda i, j, l: (0, i, j))
    out_shape = jax.ShapeDtypeStruct((p, mp, c), jnp.int32)
    body = functools.partial(kernel or _matmul_kernel, bits=bits)
    cost = matmul_bytes(m, d, c, data.dtype.itemsize, bits, bm=bm, bc=bc, bk=bk)
    out = _call(body, grid, in_specs, out_spec, out_shape, (q, data), out_init, interpret, "qsparse_int8_ternary_matmul",
                target, ("parallel", "parallel", "arbitrary"),
                pl.CostEstimate(flops=cost["flops"], transcendentals=0, bytes_accessed=cost["total"]))
    return out if mp == m else out[:, :m]


@functools.partial(jax.jit, static_argnames=("bits", "bc", "bk", "interpret", "kernel", "target"))
def gather_matmul(count, idx, qg, data, *, bits, bc=128, bk=64, interpret=False, out_init=None, kernel=None,
                  target=None):
    """Plane-major int32 ``[J, M, C]`` accumulator of ``qg [M, R]`` times the packed rows ``data[idx]``.

    ``idx`` int32 ``[R]`` lists the rows to read (first ``count`` valid; ``qg`` columns past ``count``
    are zero), ``count`` int32 ``[1]``. Only those rows of ``data [D, C]`` are used, ``bk`` per step
    (this generic form still loads whole column tiles into VMEM: interpret mode only, see the module
    docstring). ``target="gpu"``: ``pallas_gpu.gather_matmul``; ``target="tpu"``:
    ``pallas_tpu_decode.gather_matmul`` (uint32 words; ``bc``, ``bk`` and ``kernel`` do not apply, and
    ``out_init`` is its per-share buffer)."""
    target = target or jax.default_backend()
    if target == "gpu":
        _gpu_only_plain(kernel, out_init)
        return pallas_gpu.gather_matmul(count, idx, qg, words_to_bytes(data, bits), bits=bits, interpret=interpret)
    if target == "tpu":
        if kernel is not None:
            raise ValueError("kernel= applies to the generic gather kernel, not target='tpu'")
        if data.dtype == jnp.uint32:  # whole word rows by DMA
            return pallas_tpu_decode.gather_matmul(count, idx, qg, data, bits=bits, interpret=interpret,
                                                   out_init=out_init)
        # bytes: a byte row cannot be a DMA on TPU (packing); XLA gathers the rows, the batched kernel multiplies
        # (rows past count are row 0, met by zero activations)
        return matmul(qg, jnp.take(data, idx, axis=0), bits=bits, interpret=interpret, out_init=out_init,
                      target="tpu")[:, : qg.shape[0]]
    m, r = qg.shape
    d, c = data.shape
    p = planes(data.dtype, bits)
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
    # its blocks: every column tile of the whole weight, the activations once per column tile, the
    # indices once, the output once
    nbytes = d * c * data.dtype.itemsize + grid[0] * mp * rp + 4 * (rp + 1) + p * mp * c * 4
    out = _call(body, grid, in_specs, out_spec, out_shape, (count, idx, qg, data), out_init, interpret,
                "qsparse_gather_ternary_matmul", target, ("parallel", "arbitrary"),
                pl.CostEstimate(flops=2 * mp * rp * p * grid[0] * bc, transcendentals=0, bytes_accessed=nbytes))
    return out[:, :m]
