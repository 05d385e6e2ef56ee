"""TPU (Mosaic) decode kernel: DMA only the kept rows of a packed ternary weight, then int8 × ternary.

At decode a few tokens keep ``k`` of ``D`` input features each; only the packed rows of the features
kept by some token (their union, ``reference.kept_rows``) take part in ``acc = Σ_i q[m, i] · t[i, n]``.
Mosaic has no vector gather from a ref, so the rows are gathered by DMA:

- the kept-row indices ``idx`` (padded to a static bound) and their ``count`` are scalar-prefetched
  into SMEM (``PrefetchScalarGridSpec``);
- the weight stays in HBM (``memory_space=ANY``); each grid step copies the packed rows of ``BK`` kept
  features, one DMA per row (``pltpu.make_async_copy`` of a ``[1, C]`` row into a VMEM buffer), all on
  one semaphore, and waits for them one by one, as JAX's paged-attention kernels copy pages;
- two buffers: the rows of step ``l + 1`` are in flight while step ``l`` unpacks and multiplies;
- rows past ``count`` are never copied; the buffer rows they leave stale meet zero activations
  (``gather_columns`` zeroes those columns), which makes their product exactly 0 (integers).

Rows are copied whole, so the weight must be in words (``packing.tpu_layout``): TPU tiles 8-bit
arrays 4 rows to a 32-bit word, so a single byte row cannot be a DMA (Mosaic requires 32-row aligned
offsets), while one row of a 32-bit array can.

The grid is ``(splits, chunks)``: the kept rows are split into ``splits`` contiguous shares (a
"parallel" axis: the two TensorCores of a v5p megacore each take one), each share accumulates its own
int32 partial sums and XLA adds them (exact). Output, like ``pallas.gather_matmul``: the plane-major
int32 accumulator ``[J, M, C]`` (``packing``: J planes per word).

References (read, not copied): the JAX Pallas TPU guides "Scalar prefetch and block-sparse
computation" and "Pipelining" (docs.jax.dev/en/latest/pallas/tpu/), and the manual multi-page DMAs
of ``jax.experimental.pallas.ops.tpu.paged_attention`` (jax 0.10.2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .packing import planes, unpack_planes

BK = 128  # kept rows per grid step (the lane width of the activation block)
SPLITS = 2  # shares of the kept rows: one per TensorCore of a v5p megacore (v5e: run one after the other)
ROW_M = 1  # token rows are not padded: blocks span all M rows (a full dimension)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def padded_rows(rows: int, bk: int = BK, splits: int = SPLITS) -> int:
    """Static length of ``idx`` / width of the activations inside the kernel: whole steps per share."""
    return _round_up(max(rows, 1), bk * splits)


def copied_bytes(rows: int, tokens: int, columns: int, bits: float = 2, *, bk: int = BK,
                 splits: int = SPLITS) -> dict[str, int]:
    """HBM bytes one call moves, counted from the kernel's DMAs and blocks, with at most ``rows`` kept.

    weight: one ``[1, columns]`` uint32 row per kept feature (the only weight DMAs); activations: the
    int8 ``[ROW_M-padded tokens, padded_rows]`` block, each step's slice read once; indices: ``idx`` and
    ``count`` into SMEM; output: each share's int32 ``[J, tokens, columns]`` partial sums, written once.
    The declared ``cost_estimate`` is their total."""
    rp, mp = padded_rows(rows, bk, splits), _round_up(tokens, ROW_M)
    out = {"weight": rows * columns * 4, "activations": mp * rp, "indices": 4 * (rp + 1),
           "output": splits * planes(jnp.uint32, bits) * mp * columns * 4}
    out["total"] = sum(out.values())
    return out


def _decode_kernel(n_ref, idx_ref, q_ref, w_hbm, *rest, bits, bk, steps):
    o_ref, buf, sem = rest[-3:]  # an aliased out_init (poisoning in tests) comes first and is not read
    # program ids at the top level: the interpreter cannot evaluate them inside pl.when
    s, l = pl.program_id(0), pl.program_id(1)
    n = n_ref[0]
    first = s * steps  # this share's first step over the whole list of kept rows
    mine = jnp.clip(pl.cdiv(n, bk) - first, 0, steps)  # steps of this share that hold kept rows

    def rows_in(step):
        return jnp.clip(n - (first + step) * bk, 0, bk)

    def start(step, slot):
        def one(r, carry):
            row = idx_ref[(first + step) * bk + r]
            pltpu.make_async_copy(w_hbm.at[pl.ds(row, 1)], buf.at[slot, pl.ds(r, 1)], sem.at[slot]).start()
            return carry

        lax.fori_loop(0, rows_in(step), one, 0)

    def wait(step, slot):
        def one(r, carry):  # every row copy has the same size: wait for them one by one
            pltpu.make_async_copy(w_hbm.at[pl.ds(0, 1)], buf.at[slot, pl.ds(0, 1)], sem.at[slot]).wait()
            return carry

        lax.fori_loop(0, rows_in(step), one, 0)

    @pl.when(l == 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

        @pl.when(mine > 0)
        def _():
            start(0, 0)

    @pl.when(l < mine)
    def _():
        slot = l % 2

        @pl.when(l + 1 < mine)
        def _():
            start(l + 1, 1 - slot)  # the next rows fly while these are multiplied

        wait(l, slot)
        q = q_ref[...]
        for j, t in enumerate(unpack_planes(buf[slot], bits)):
            o_ref[j] += jnp.dot(q, t, preferred_element_type=jnp.int32)


@functools.partial(jax.jit, static_argnames=("bits", "bk", "splits", "interpret"))
def gather_matmul(count, idx, qg, data, *, bits, bk=BK, splits=SPLITS, interpret=False, out_init=None):
    """Plane-major int32 ``[J, M, C]`` accumulator of ``qg [M, R]`` times the packed rows ``data[idx]``.

    ``data``: uint32 words ``[D, C]`` (``packing.tpu_layout``), left in HBM; ``idx`` int32 ``[R]``: the
    rows to read, the first ``count`` (int32 ``[1]``) valid; ``qg`` int8, its columns past ``count``
    zero. Copies ``count`` rows of ``C`` words (``copied_bytes``). ``out_init`` (tests: poisoning) must
    be int32 ``[splits, J, ROW_M-padded M, C]``: the shares' partial sums before XLA adds them."""
    if data.dtype != jnp.uint32 or data.ndim != 2:
        raise ValueError(f"the TPU decode kernel copies whole rows and needs uint32 words [in, C] "
                         f"(packing.tpu_layout), got {data.dtype}{list(data.shape)}")
    if bk % 128:
        raise ValueError(f"bk must be a multiple of 128 (the activation block's lanes), got {bk}")
    m, r = qg.shape
    c = data.shape[1]
    j = planes(data.dtype, bits)
    mp, rp = _round_up(m, ROW_M), padded_rows(r, bk, splits)
    steps = rp // (bk * splits)
    qg = jnp.pad(qg, ((0, mp - m), (0, rp - r)))  # the gathered [M, R] activations: small
    idx = jnp.pad(idx.astype(jnp.int32), (0, rp - r))
    out_shape = jax.ShapeDtypeStruct((splits, j, mp, c), jnp.int32)
    in_specs = [pl.BlockSpec((mp, bk), lambda s, l, n, ix: (0, s * steps + l)),
                pl.BlockSpec(memory_space=pltpu.HBM)]
    if not interpret:  # keep the weight in HBM: XLA would otherwise prefetch it whole into VMEM
        data = pltpu.with_memory_space_constraint(data, pltpu.HBM)
    args, aliases = (count.astype(jnp.int32).reshape(1), idx, qg, data), {}
    if out_init is not None:
        if out_init.shape != out_shape.shape or out_init.dtype != out_shape.dtype:
            raise ValueError(f"out_init must be {out_shape.dtype}{list(out_shape.shape)}, "
                             f"got {out_init.dtype}{list(out_init.shape)}")
        aliases = {len(args): 0}  # counted with the scalar-prefetch operands
        args = (*args, out_init)
        in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(splits, steps), in_specs=in_specs,
        out_specs=pl.BlockSpec((None, j, mp, c), lambda s, l, n, ix: (s, 0, 0, 0)),
        scratch_shapes=[pltpu.VMEM((2, bk, c), jnp.uint32), pltpu.SemaphoreType.DMA((2,))])
    nbytes = copied_bytes(r, m, c, bits, bk=bk, splits=splits)["total"]
    out = pl.pallas_call(
        functools.partial(_decode_kernel, bits=bits, bk=bk, steps=steps),
        grid_spec=grid_spec, out_shape=out_shape, input_output_aliases=aliases, interpret=interpret,
        name="qsparse_tpu_decode_kept_rows",
        compiler_params=None if interpret else pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        # at most r rows are multiplied: 2 ops per int8 × ternary product, J planes of C columns
        cost_estimate=pl.CostEstimate(flops=2 * mp * r * j * c, transcendentals=0, bytes_accessed=nbytes),
    )(*args)
    return out.sum(axis=0)[:, :m]
