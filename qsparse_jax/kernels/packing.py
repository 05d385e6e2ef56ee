"""Packed ternary weights: 2 bits (4 per byte) or base-3 1.6 bits (5 per byte), input-feature major.

BitNet b1.58 weights are ``t ∈ {−1, 0, 1}`` with one per-tensor scale ``s_w = 1/max(mean|w|, 1e-5)``
(Eq. 9–10, ``quant.ternary_weights``), so ``w ≈ t / s_w``. Our weights are stored ``[in, out]``;
packing keeps that orientation so that row ``i`` of the packed array holds every output weight of
input feature ``i``: top-K decode reads only the rows of the kept features (SEEDS §4).

Layout, "planes": with ``P`` values per byte and ``C = ceil(out / P)`` bytes per row, byte ``c`` of
row ``i`` holds the codes ``t[i, p·C + c] + 1`` for ``p = 0..P−1``:

- ``P = 4`` (2 bits): ``byte = Σ_p code_p << 2p``;
- ``P = 5`` (1.6 bits, base 3): ``byte = Σ_p code_p · 3^p`` (≤ 242).

Columns past ``out`` are padded with ``t = 0``. Plane ``p`` of a byte tile ``[:, c0:c1]`` is the
contiguous output slice ``[p·C + c0, p·C + c1)``, so a kernel unpacks a tile with shifts (or a
division) and writes ``P`` contiguous output slices: no interleaving of lanes is needed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..ops.quant import ternary_weights

BITS = (2, 1.6)
_PER_BYTE = {2: 4, 1.6: 5}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedTernary:
    """Ternary weight ``w[in, out] ≈ t / scale`` packed ``P`` codes per byte (module docstring).

    data: uint8 ``[in, ceil(out / P)]``; scale: float32 scalar ``s_w``; out_features and bits are
    static (pytree metadata), so a ``PackedTernary`` passes through ``jit`` and ``tree_map``."""

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
    def shape(self) -> tuple[int, int]:
        """Shape of the unpacked weight ``[in, out]``."""
        return (self.data.shape[0], self.out_features)


def _check_bits(bits):
    if bits not in _PER_BYTE:
        raise ValueError(f"bits must be one of {BITS} (4 or 5 ternary values per byte), got {bits!r}")
    return _PER_BYTE[bits]


def packed_columns(out_features: int, bits: float = 2) -> int:
    """Bytes per packed row: ``ceil(out / P)``."""
    return -(-out_features // _check_bits(bits))


def pack_levels(levels: jax.Array, scale, bits: float = 2) -> PackedTernary:
    """Pack ternary levels ``int [in, out]`` in {−1, 0, 1} with their scale ``s_w`` (no checks of the values)."""
    p = _check_bits(bits)
    if levels.ndim != 2:
        raise ValueError(f"ternary levels must be 2-D [in, out], got shape {levels.shape}")
    d, n = levels.shape
    c = packed_columns(n, bits)
    codes = jnp.pad(levels.astype(jnp.int32) + 1, ((0, 0), (0, p * c - n)), constant_values=1)
    planes = codes.reshape(d, p, c)
    weights = (1 << (2 * jnp.arange(p))) if p == 4 else 3 ** jnp.arange(p)
    data = jnp.sum(planes * weights[None, :, None], axis=1).astype(jnp.uint8)
    return PackedTernary(data, jnp.asarray(scale, jnp.float32).reshape(()), n, bits)


def pack_ternary(w: jax.Array, bits: float = 2) -> PackedTernary:
    """BitNet absmean ternary quantization of a float weight ``[in, out]`` (Eq. 9–10), packed."""
    w = jnp.asarray(w)
    if w.ndim != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"weight must be a 2-D float array [in, out], got {w.dtype} {w.shape}")
    levels, scale = ternary_weights(w)
    return pack_levels(levels, scale, bits)


def unpack_planes(data: jax.Array, bits: float = 2) -> list[jax.Array]:
    """The ``P`` int8 level planes ``[..., C]`` of packed bytes: plane p = columns ``p·C + c``.

    Written with element-wise integer ops only, so kernels call it on a tile."""
    p = _check_bits(bits)
    b = data.astype(jnp.int32)
    if p == 4:
        return [(((b >> (2 * i)) & 3) - 1).astype(jnp.int8) for i in range(p)]
    return [((b // 3 ** i) % 3 - 1).astype(jnp.int8) for i in range(p)]


def unpack_levels(w: PackedTernary) -> jax.Array:
    """Ternary levels int8 ``[in, out]`` (exact inverse of ``pack_levels``)."""
    return jnp.concatenate(unpack_planes(w.data, w.bits), axis=-1)[:, : w.out_features]


def dequantize(w: PackedTernary, dtype=jnp.float32) -> jax.Array:
    """``t / s_w``: exactly ``quant.quantize_weights(w, "1.58")`` of the weight that was packed."""
    t = unpack_levels(w).astype(jnp.float32)
    # a full-shape divisor behind a barrier keeps the true division, as quant._dequantize does
    s = jax.lax.optimization_barrier(jnp.broadcast_to(w.scale, t.shape))
    return (t / s).astype(dtype)
