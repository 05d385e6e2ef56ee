"""Packed ternary weights: 2 bits (4 per byte) or base-3 1.6 bits (5 per byte), input-feature major.

BitNet b1.58 weights are ``t ∈ {−1, 0, 1}`` with one per-tensor scale ``s_w = 1/max(mean|w|, 1e-5)``
(Eq. 9–10, ``quant.ternary_weights``), so ``w ≈ t / s_w``. Our weights are stored ``[in, out]``;
packing keeps that orientation so that row ``i`` of the packed array holds every output weight of
input feature ``i``: top-K decode reads only the rows of the kept features (SEEDS §4).

Layout, "planes": with ``P`` values per byte, a storage unit of ``B`` bytes (``uint8``: B = 1, the
default; ``uint32`` "words": B = 4) and ``C`` units per row, unit ``c`` of row ``i`` holds the codes
``t[i, j·C + c] + 1`` for the ``J = B·P`` planes ``j = b·P + p`` (byte ``b`` of the unit, value ``p``
of the byte):

- ``P = 4`` (2 bits): ``byte = Σ_p code_p << 2p``;
- ``P = 5`` (1.6 bits, base 3): ``byte = Σ_p code_p · 3^p`` (≤ 242);
- a word is its bytes little-endian: ``word = Σ_b byte_b << 8b``.

``C = ceil(out / J)`` rounded up to a multiple of ``align``; columns past ``out`` hold ``t = 0``.
Plane ``j`` of a unit tile ``[:, c0:c1]`` is the contiguous output slice ``[j·C + c0, j·C + c1)``, so a
kernel unpacks a tile with shifts (or a division) and writes ``J`` contiguous output slices: no
interleaving of lanes is needed.

Why two units and ``align``, for TPU (``tpu_layout``): XLA gives a ``[D, C]`` weight whose ``C`` is not
a multiple of 128 a column-major HBM layout and copies it into the kernel's row-major one before every
call (``align=128`` avoids it); and TPU HBM/VMEM tile 8-bit arrays 4 rows to a 32-bit word, so one
byte row cannot be copied alone (Mosaic: "offsets along tiled dimensions must be aligned to tiles",
32 rows), while one row of a 32-bit array can: the decode kernel that DMAs only the kept rows
(``pallas_tpu_decode``) reads words.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from ..ops.quant import ternary_weights

BITS = (2, 1.6)
_PER_BYTE = {2: 4, 1.6: 5}
_UNIT_BYTES = {jnp.dtype(jnp.uint8): 1, jnp.dtype(jnp.uint32): 4}
TPU_ALIGN = 128  # lanes: a TPU tile's minor dimension


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedTernary:
    """Ternary weight ``w[in, out] ≈ t / scale`` packed ``P`` codes per byte (module docstring).

    data: uint8 ``[in, C]`` (or uint32 words, ``tpu_layout``); scale: float32 scalar ``s_w``;
    out_features and bits are static (pytree metadata), so a ``PackedTernary`` passes through ``jit``
    and ``tree_map``."""

    data: jax.Array
    scale: jax.Array
    out_features: int = dataclasses.field(metadata=dict(static=True))
    bits: float = dataclasses.field(default=2, metadata=dict(static=True))

    @property
    def in_features(self) -> int:
        return self.data.shape[0]

    @property
    def per_byte(self) -> int:
        return _PER_BYTE[self.bits]

    @property
    def planes(self) -> int:
        """Codes per storage unit ``J``: 4 / 5 for bytes, 16 / 20 for words."""
        return planes(self.data.dtype, self.bits)

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the unpacked weight ``[in, out]``."""
        return (self.data.shape[0], self.out_features)


def _check_bits(bits):
    if bits not in _PER_BYTE:
        raise ValueError(f"bits must be one of {BITS} (4 or 5 ternary values per byte), got {bits!r}")
    return _PER_BYTE[bits]


def _unit_bytes(unit) -> int:
    dt = jnp.dtype(unit)
    if dt not in _UNIT_BYTES:
        raise ValueError(f"packed unit must be uint8 or uint32, got {dt}")
    return _UNIT_BYTES[dt]


def planes(unit, bits: float = 2) -> int:
    """Codes per storage unit: ``P`` per byte times the unit's bytes."""
    return _check_bits(bits) * _unit_bytes(unit)


def packed_columns(out_features: int, bits: float = 2, unit=jnp.uint8, align: int = 1) -> int:
    """Units per packed row: ``ceil(out / J)`` rounded up to a multiple of ``align``."""
    c = -(-out_features // planes(unit, bits))
    return -(-c // align) * align


def layout_error(w: PackedTernary) -> str | None:
    """One line saying why ``w.data`` is not a packing of ``w.out_features`` columns, or None."""
    dt = w.data.dtype
    if w.data.ndim != 2 or dt not in _UNIT_BYTES:
        return f"w.data must be uint8 (or uint32 words) [in, C], got {dt}{list(w.data.shape)}"
    least = packed_columns(w.out_features, w.bits, dt)
    if w.data.shape[1] < least:
        return f"w.data has {w.data.shape[1]} packed columns; out_features={w.out_features} needs at least {least}"
    return None


def pack_levels(levels: jax.Array, scale, bits: float = 2, *, unit=jnp.uint8, align: int = 1) -> PackedTernary:
    """Pack ternary levels ``int [in, out]`` in {−1, 0, 1} with their scale ``s_w`` (no checks of the values).

    ``unit``: uint8 (default) or uint32 words; ``align``: round the packed columns up to a multiple
    of it (128 for TPU, see the module docstring)."""
    p = _check_bits(bits)
    nb = _unit_bytes(unit)
    if levels.ndim != 2:
        raise ValueError(f"ternary levels must be 2-D [in, out], got shape {levels.shape}")
    if not isinstance(align, int) or align < 1:
        raise ValueError(f"align must be a positive integer, got {align!r}")
    d, n = levels.shape
    c = packed_columns(n, bits, unit, align)
    j = p * nb
    codes = jnp.pad((levels.astype(jnp.int32) + 1).astype(jnp.uint32), ((0, 0), (0, j * c - n)), constant_values=1)
    digit = (1 << (2 * jnp.arange(p, dtype=jnp.uint32))) if p == 4 else 3 ** jnp.arange(p, dtype=jnp.uint32)
    weights = (digit[None, :] << (8 * jnp.arange(nb, dtype=jnp.uint32))[:, None]).reshape(j)  # plane b·P + p
    data = jnp.sum(codes.reshape(d, j, c) * weights[None, :, None], axis=1, dtype=jnp.uint32).astype(unit)
    return PackedTernary(data, jnp.asarray(scale, jnp.float32).reshape(()), n, bits)


def pack_ternary(w: jax.Array, bits: float = 2, *, unit=jnp.uint8, align: int = 1) -> PackedTernary:
    """BitNet absmean ternary quantization of a float weight ``[in, out]`` (Eq. 9–10), packed."""
    w = jnp.asarray(w)
    if w.ndim != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"weight must be a 2-D float array [in, out], got {w.dtype} {w.shape}")
    levels, scale = ternary_weights(w)
    return pack_levels(levels, scale, bits, unit=unit, align=align)


def repack(w: PackedTernary, *, unit=jnp.uint8, align: int = 1) -> PackedTernary:
    """The same weight in another layout (exact; reads and writes the whole weight once)."""
    return pack_levels(unpack_levels(w), w.scale, w.bits, unit=unit, align=align)


def words_to_bytes(data: jax.Array, bits: float = 2) -> jax.Array:
    """uint32 words ``[D, W]`` → the uint8 bytes ``[D, 4W]`` of the same ``J·W`` columns in the same order
    (so ``planes_to_columns`` of either accumulator gives the same ``[M, out]``). A full copy: for a
    kernel that reads bytes only (GPU), handed words."""
    if data.dtype == jnp.uint8:
        return data
    levels = jnp.concatenate(unpack_planes(data, bits), axis=-1)
    return pack_levels(levels, 1.0, bits).data


def tpu_layout(w: PackedTernary) -> PackedTernary:
    """uint32 words, columns a multiple of 128: read by the TPU kernels without a relayout copy, and
    row by row by the decode kernel (module docstring). Convert once, when the weights are loaded."""
    return repack(w, unit=jnp.uint32, align=TPU_ALIGN)


def unpack_planes(data: jax.Array, bits: float = 2) -> list[jax.Array]:
    """The ``J`` int8 level planes ``[..., C]`` of packed units: plane j = columns ``j·C + c``.

    Written with element-wise integer ops only (a same-width bitcast for words), so kernels call it
    on a tile."""
    p = _check_bits(bits)
    nb = _unit_bytes(data.dtype)
    if nb == 1:
        b = data.astype(jnp.int32)
    else:  # bits as int32: shifts are arithmetic, the masks below drop the sign
        b = lax.bitcast_convert_type(data, jnp.int32)
    out = []
    for byte in range(nb):
        if p == 4:  # the 2-bit fields of the whole unit, in order
            out += [(((b >> (8 * byte + 2 * i)) & 3) - 1).astype(jnp.int8) for i in range(p)]
        else:  # base-3 digits of a byte: t // 3 == (t · 171) >> 9 for 0 ≤ t ≤ 255 (no integer division,
            # which a TPU's vector unit does not have)
            t = b if nb == 1 else (b >> (8 * byte)) & 0xFF
            for _ in range(p):
                t3 = (t * 171) >> 9
                out.append((t - 3 * t3 - 1).astype(jnp.int8))
                t = t3
    return out


def unpack_levels(w: PackedTernary) -> jax.Array:
    """Ternary levels int8 ``[in, out]`` (exact inverse of ``pack_levels``)."""
    return jnp.concatenate(unpack_planes(w.data, w.bits), axis=-1)[:, : w.out_features]


def dequantize(w: PackedTernary, dtype=jnp.float32) -> jax.Array:
    """``t / s_w``: exactly ``quant.quantize_weights(w, "1.58")`` of the weight that was packed."""
    t = unpack_levels(w).astype(jnp.float32)
    # a full-shape divisor behind a barrier keeps the true division, as quant._dequantize does
    s = jax.lax.optimization_barrier(jnp.broadcast_to(w.scale, t.shape))
    return (t / s).astype(dtype)
