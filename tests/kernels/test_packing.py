"""Packed ternary weights: exact round trip, BitNet's absmean levels and scale, input-feature-major rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsparse_jax.kernels import PackedTernary, dequantize, pack_levels, pack_ternary, unpack_levels
from qsparse_jax.kernels.packing import layout_error, packed_columns, tpu_layout, unpack_planes, words_to_bytes
from qsparse_jax.ops.quant import quantize_weights, ternary_weights

BITS = [2, 1.6]


def _levels(seed, d, n):
    return np.random.default_rng(seed).integers(-1, 2, (d, n)).astype(np.int8)


def _weight(seed, d, n):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(d, n)).astype(np.float32))


@pytest.mark.parametrize("bits", BITS)
@settings(max_examples=5)
@given(d=st.integers(1, 40), n=st.integers(1, 70), seed=st.integers(0, 2**31))
def test_round_trip_is_exact(bits, d, n, seed):
    t = _levels(seed, d, n)
    p = pack_levels(jnp.asarray(t), 0.5, bits)
    assert p.data.dtype == jnp.uint8 and p.data.shape == (d, packed_columns(n, bits))
    np.testing.assert_array_equal(unpack_levels(p), t)


@pytest.mark.parametrize("bits,per_byte", [(2, 4), (1.6, 5)])
def test_bytes_hold_four_or_five_values(bits, per_byte):
    for n in (1, per_byte - 1, per_byte, per_byte + 1, 4 * per_byte + 3):  # out not a multiple of P too
        p = pack_levels(jnp.asarray(_levels(n, 3, n)), 1.0, bits)
        assert p.data.shape[1] == -(-n // per_byte)
    full = pack_levels(jnp.ones((2, 5 * per_byte), jnp.int8), 1.0, bits)
    assert int(full.data.max()) == (0b10101010 if per_byte == 4 else 242)  # all codes 2: 2·(1+3+9+27+81) = 242


@pytest.mark.parametrize("bits", BITS)
def test_levels_and_scale_are_bitnet_absmean(bits):
    w = _weight(1, 37, 53)
    p = pack_ternary(w, bits)
    t, s = ternary_weights(w)  # Eq. 9–10
    np.testing.assert_array_equal(unpack_levels(p), t)
    assert p.scale.shape == () and p.scale.dtype == jnp.float32 and float(p.scale) == float(s)


@pytest.mark.parametrize("bits", BITS)
def test_dequantize_equals_training_fake_quant(bits):
    w = _weight(2, 29, 31)
    np.testing.assert_array_equal(dequantize(pack_ternary(w, bits)), quantize_weights(w, "1.58"))


@pytest.mark.parametrize("bits", BITS)
def test_row_i_holds_input_feature_i(bits):
    t = _levels(3, 20, 23)
    p = pack_levels(jnp.asarray(t), 1.0, bits)
    rows = np.array([17, 2, 9])
    np.testing.assert_array_equal(p.data[rows], pack_levels(jnp.asarray(t[rows]), 1.0, bits).data)


@pytest.mark.parametrize("bits", BITS)
def test_plane_p_is_a_contiguous_column_slice(bits):
    t = _levels(4, 6, 13)
    p = pack_levels(jnp.asarray(t), 1.0, bits)
    c = p.data.shape[1]
    padded = np.pad(t, ((0, 0), (0, p.per_byte * c - t.shape[1])))
    for i, plane in enumerate(unpack_planes(p.data, bits)):
        np.testing.assert_array_equal(plane, padded[:, i * c:(i + 1) * c])


def test_is_a_pytree_with_static_shape_fields():
    p = pack_ternary(_weight(5, 8, 9), 1.6)
    leaves = jax.tree.leaves(p)
    assert len(leaves) == 2
    q = jax.jit(lambda p: p)(p)
    assert isinstance(q, PackedTernary) and q.out_features == 9 and q.bits == 1.6 and q.shape == (8, 9)
    np.testing.assert_array_equal(q.data, p.data)


@pytest.mark.parametrize("call,match", [
    (lambda: pack_ternary(jnp.ones((4, 4)), bits=3), r"bits must be one of \(2, 1.6\)"),
    (lambda: pack_ternary(jnp.ones((4,))), "2-D float array"),
    (lambda: pack_ternary(jnp.ones((4, 4), jnp.int32)), "2-D float array"),
    (lambda: pack_levels(jnp.ones((4,), jnp.int8), 1.0), "2-D"),
])
def test_bad_inputs_raise_one_line_errors(call, match):
    with pytest.raises(ValueError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("unit,align", [(jnp.uint8, 128), (jnp.uint32, 1), (jnp.uint32, 128)])
def test_words_and_aligned_columns_round_trip(bits, unit, align):
    """uint32 words hold 4 bytes (16 / 20 values), columns rounded up to ``align`` hold t = 0; the round trip is
    exact and every layout of one weight dequantizes alike."""
    t = _levels(6, 7, 45)
    p = pack_levels(jnp.asarray(t), 0.5, bits, unit=unit, align=align)
    per_unit = {2: 4, 1.6: 5}[bits] * jnp.dtype(unit).itemsize
    c = -(-(-(-45 // per_unit)) // align) * align
    assert p.data.dtype == unit and p.data.shape == (7, c) == (7, packed_columns(45, bits, unit, align))
    assert p.planes == per_unit and layout_error(p) is None
    np.testing.assert_array_equal(unpack_levels(p), t)
    padded = np.pad(t, ((0, 0), (0, per_unit * c - 45)))
    for j, plane in enumerate(unpack_planes(p.data, bits)):  # plane j = columns j·C + c, t = 0 past out
        np.testing.assert_array_equal(plane, padded[:, j * c:(j + 1) * c])
    w = _weight(7, 30, 45)
    np.testing.assert_array_equal(dequantize(pack_ternary(w, bits, unit=unit, align=align)),
                                  dequantize(pack_ternary(w, bits)))


@pytest.mark.parametrize("bits", BITS)
def test_word_layout_bits(bits):
    """A word is its bytes little-endian, byte b holding planes b·P … b·P + P − 1 (module docstring)."""
    p = {2: 4, 1.6: 5}[bits]
    t = np.zeros((1, 4 * p), np.int8)
    t[0, p + 1] = 1  # plane P + 1 (byte 1, value 1) of the only word: code 2, every other code 1
    word = int(pack_levels(jnp.asarray(t), 1.0, bits, unit=jnp.uint32).data[0, 0])
    ones = sum(1 << (2 * i) for i in range(4)) if p == 4 else sum(3 ** i for i in range(5))
    byte1 = ones + ((1 << 2) if p == 4 else 3)
    assert word == ones | (byte1 << 8) | (ones << 16) | (ones << 24)


@pytest.mark.parametrize("bits", BITS)
def test_tpu_layout_and_words_to_bytes_keep_the_weight(bits):
    w = pack_ternary(_weight(8, 9, 11008), bits)
    tw = tpu_layout(w)
    assert tw.data.dtype == jnp.uint32 and tw.data.shape[1] == (768 if bits == 2 else 640)  # 688 / 551 → 128s
    np.testing.assert_array_equal(unpack_levels(tw), unpack_levels(w))
    b = words_to_bytes(tw.data, bits)  # the same columns in the same order, as bytes
    assert b.dtype == jnp.uint8 and b.shape == (9, 4 * tw.data.shape[1])
    np.testing.assert_array_equal(jnp.concatenate(unpack_planes(b, bits), -1),
                                  jnp.concatenate(unpack_planes(tw.data, bits), -1))
    assert words_to_bytes(w.data, bits) is w.data


def test_layout_errors_are_one_line():
    w = pack_ternary(_weight(9, 4, 40), 2)
    assert layout_error(PackedTernary(w.data[:, :9], w.scale, 40, 2)) == (
        "w.data has 9 packed columns; out_features=40 needs at least 10")
    assert "uint8 (or uint32 words)" in layout_error(PackedTernary(w.data.astype(jnp.int32), w.scale, 40, 2))
    with pytest.raises(ValueError, match="uint8 or uint32"):
        pack_levels(jnp.ones((2, 2), jnp.int8), 1.0, unit=jnp.int32)
    with pytest.raises(ValueError, match="align must be a positive integer"):
        pack_levels(jnp.ones((2, 2), jnp.int8), 1.0, align=0)
