"""The Triton (GPU) kernels equal the exact integer accumulator, in the Pallas interpreter on CPU.

An independent reference: numpy's int64 product of the int8 activations and the unpacked levels.
Shapes that are not multiples of the tiles (the masked edges), both packings (4 and 5 values per
byte), several splits of the kept rows. Lowering to Triton IR for CUDA is checked too (power-of-2
arrays and the masked loads are lowering-time rules)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsparse_jax.kernels import pack_ternary
from qsparse_jax.kernels import pallas as kp
from qsparse_jax.kernels import pallas_gpu as kg
from qsparse_jax.kernels import reference as ref
from qsparse_jax.kernels.packing import unpack_levels


def _case(seed, m, d, n, bits, keep):
    rng = np.random.default_rng(seed)
    w = pack_ternary(jnp.asarray(rng.normal(size=(d, n)).astype(np.float32)), bits)
    k = max(1, int(keep * d))
    q, _ = ref.quantize_input(jnp.asarray(rng.normal(size=(m, d)).astype(np.float32)), k)
    expect = np.asarray(q).astype(np.int64) @ np.asarray(unpack_levels(w)).astype(np.int64)
    assert np.abs(expect).max() > 0
    return q, w, k, expect


def _cols(acc, w):
    return np.asarray(kp.planes_to_columns(acc, w.out_features))


@settings(max_examples=3, deadline=None)
@given(m=st.integers(1, 40), d=st.integers(20, 300), n=st.integers(5, 90), bits=st.sampled_from([2, 1.6]),
       keep=st.floats(0.1, 1.0), seed=st.integers(0, 2**31))
def test_gpu_matmul_kernel_equals_integer_product(m, d, n, bits, keep, seed):
    q, w, _, expect = _case(seed, m, d, n, bits, keep)
    acc = kg.matmul(q, w.data, bits=bits, bm=16, bc=16, bk=32, interpret=True)
    np.testing.assert_array_equal(_cols(acc, w), expect)


@settings(max_examples=3, deadline=None)
@given(m=st.integers(1, 8), d=st.integers(20, 300), n=st.integers(5, 90), bits=st.sampled_from([2, 1.6]),
       keep=st.floats(0.05, 0.9), splits=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_gpu_gather_kernel_reads_kept_rows_and_equals_integer_product(m, d, n, bits, keep, splits, seed):
    q, w, k, expect = _case(seed, m, d, n, bits, keep)
    idx, count = ref.kept_rows(q, min(d, m * k))
    qg = ref.gather_columns(q, idx, count)
    acc = kg.gather_matmul(count[None], idx, qg, w.data, bits=bits, bc=16, bk=16, splits=splits, interpret=True)
    np.testing.assert_array_equal(_cols(acc, w), expect)


def test_gpu_gather_kernel_ignores_rows_that_are_not_kept():
    q, w, k, expect = _case(5, 2, 96, 30, 2, 0.2)
    dropped = ~np.asarray(jnp.any(q != 0, axis=0))
    w_bad = type(w)(w.data.at[dropped].set(0), w.scale, w.out_features, w.bits)
    idx, count = ref.kept_rows(q, 2 * k)
    acc = kg.gather_matmul(count[None], idx, ref.gather_columns(q, idx, count), w_bad.data, bits=2, bc=16, bk=16,
                           splits=2, interpret=True)
    np.testing.assert_array_equal(_cols(acc, w), expect)


@pytest.mark.parametrize("bits", [2, 1.6])
@pytest.mark.parametrize("kernel", ["matmul", "gather"])
def test_gpu_kernels_lower_to_triton_with_default_tiles(kernel, bits):
    w = pack_ternary(jnp.ones((1000, 333), jnp.float32), bits)
    if kernel == "matmul":
        f, args = functools.partial(kp.matmul, bits=bits, target="gpu"), (jnp.ones((40, 1000), jnp.int8), w.data)
    else:
        f = functools.partial(kp.gather_matmul, bits=bits, target="gpu")
        args = (jnp.array([400], jnp.int32), jnp.arange(400, dtype=jnp.int32), jnp.ones((3, 400), jnp.int8), w.data)
    assert "xla.gpu.triton" in jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_gpu_path_refuses_the_generic_kernels_test_hooks():
    w = pack_ternary(jnp.ones((64, 8), jnp.float32))
    with pytest.raises(ValueError, match="generic"):
        kp.matmul(jnp.ones((2, 64), jnp.int8), w.data, bits=2, target="gpu", out_init=jnp.zeros((4, 16, 2), jnp.int32))
