"""Quantizers against numpy transcriptions of the PyTorch reference formulas (SEEDS.md §1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qsparse_jax.ops.quant import activation_int8, binary_weights, quantize_activations, quantize_weights, ternary_weights

f32 = np.float32


def np_activation_quant(x):
    """activation_quant: s = 127 / clamp(max|x|, 1e-5); clamp(round(x·s), −128, 127) / s."""
    s = f32(127) / np.maximum(np.abs(x).max(-1, keepdims=True), f32(1e-5))
    return np.clip(np.round(x * s), -128, 127) / s


def np_weight_quant(w, mean_abs):
    """weight_quant: s = 1 / clamp(mean|w|, 1e-5); clamp(round(w·s), −1, 1) / s."""
    s = f32(1) / np.maximum(mean_abs, f32(1e-5))
    return np.clip(np.round(w * s), -1, 1) / s


def rand(seed, shape, scale=1.0):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape) * scale, np.float32)


@given(seed=st.integers(0, 2**16), rows=st.integers(1, 5), d=st.integers(1, 300),
       scale=st.sampled_from([1e-7, 1e-3, 1.0, 300.0]))
def test_activation_quant_matches_reference_bit_for_bit(seed, rows, d, scale):
    x = rand(seed, (rows, d), scale)
    want = np_activation_quant(x)
    got = np.asarray(quantize_activations(jnp.asarray(x)))
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
    q, s = activation_int8(jnp.asarray(x))
    assert q.dtype == jnp.int8 and int(jnp.abs(q).max()) <= 128
    np.testing.assert_array_equal(np.asarray(q, f32) / np.asarray(s), want)


def test_round_half_to_even():
    # 0.5·s and 1.5·s land exactly on .5 after scaling by s = 127/127 = 1: torch.round gives 0 and 2
    x = jnp.asarray([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]], jnp.float32)
    np.testing.assert_array_equal(quantize_activations(x), [[127.0, 0.0, 2.0, 2.0, -0.0, -2.0]])


@given(seed=st.integers(0, 2**16), shape=st.tuples(st.integers(1, 64), st.integers(1, 64)),
       scale=st.sampled_from([1e-8, 0.02, 1.0]))
def test_ternary_weights_match_reference(seed, shape, scale):
    w = rand(seed, shape, scale)
    q, s = ternary_weights(jnp.asarray(w))
    # mean|w| is a float32 reduction in the backend's summation order: close to float64, not bit-equal
    mean_jax = f32(jnp.mean(jnp.abs(jnp.asarray(w))))
    np.testing.assert_allclose(mean_jax, np.abs(w.astype(np.float64)).mean(), rtol=1e-6)
    assert np.asarray(s) == f32(1) / np.maximum(mean_jax, f32(1e-5))
    # given the same mean, every element is bit-for-bit the reference
    want = np_weight_quant(w, mean_jax)
    got = np.asarray(quantize_weights(jnp.asarray(w), "1.58"))
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
    np.testing.assert_array_equal(np.asarray(q, f32) / np.asarray(s), want)


def test_ternary_values_are_minus_alpha_zero_alpha():
    w = jnp.asarray(rand(7, (48, 40), 0.05))
    u = np.asarray(quantize_weights(w))
    q, s = ternary_weights(w)
    alpha = f32(1) / np.asarray(s)  # = mean|w| up to the reciprocal's rounding
    np.testing.assert_allclose(alpha, np.abs(np.asarray(w)).mean(), rtol=1e-6)
    assert set(np.unique(u).tolist()) == {-float(alpha), 0.0, float(alpha)}
    assert set(np.unique(np.asarray(q)).tolist()) == {-1, 0, 1}


def test_one_bit_weights_are_sign_times_mean_abs():
    w = rand(8, (32, 16), 0.1) + 0.01
    got = np.asarray(quantize_weights(jnp.asarray(w), "1"))
    alpha = f32(jnp.mean(jnp.abs(jnp.asarray(w))))
    np.testing.assert_array_equal(got, np.sign(w - f32(jnp.mean(jnp.asarray(w)))) * alpha)
    q, a = binary_weights(jnp.asarray(w))
    assert set(np.unique(np.asarray(q))) <= {-1, 1}


@pytest.mark.parametrize("fn", [quantize_activations, lambda w: quantize_weights(w, "1.58"),
                                lambda w: quantize_weights(w, "1")])
def test_straight_through_gradient_is_identity(fn):
    x = jnp.asarray(rand(9, (6, 20)))
    g = jnp.asarray(rand(10, (6, 20)))
    _, vjp = jax.vjp(fn, x)
    np.testing.assert_array_equal(vjp(g)[0], g)


def test_bf16_input_keeps_dtype():
    x = jnp.asarray(rand(11, (3, 16))).astype(jnp.bfloat16)
    assert quantize_activations(x).dtype == jnp.bfloat16
    assert quantize_weights(x).dtype == jnp.bfloat16


def test_unknown_weight_bits_is_one_line_error():
    with pytest.raises(ValueError, match=r"weight bits must be one of \('1.58', '1'\), got '2'"):
        quantize_weights(jnp.ones((2, 2)), "2")
