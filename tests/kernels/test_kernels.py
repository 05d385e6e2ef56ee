"""Kernels equal their XLA reference: exact int32 accumulators, y within float32 rounding.

Pallas kernels run in interpret mode on CPU with small tiles, so edges (sizes that are not a multiple
of the tile) are exercised; their output buffer is poisoned with a sentinel first, so a tile the
kernel never writes fails the comparison (shown with a deliberately broken kernel).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax.experimental import pallas as pl

from qsparse_jax.kernels import DECODE_MAX_TOKENS, IMPLS, pack_ternary, qsparse_matmul
from qsparse_jax.kernels import pallas as kp
from qsparse_jax.kernels import reference as ref
from qsparse_jax.kernels.packing import dequantize
from qsparse_jax.ops.quant import quantize_activations, quantize_weights
from qsparse_jax.ops.topk import topk_sparsify

SENTINEL = np.iinfo(np.int32).min  # |acc| ≤ 128·D, so never a real accumulator
TILES = dict(bc=4, bk=32)  # small tiles: several per axis at test sizes


def _x(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _w(seed, d, n, bits=2):
    wf = _x(seed + 1, d, n)
    return wf, pack_ternary(wf, bits)


def _poison(m, d, n, bits):
    p = 4 if bits == 2 else 5
    return jnp.full((p, kp._round_up(m, 16), -(-n // p)), SENTINEL, jnp.int32)


def _numpy_y(x, wf, k):
    """The layer by the paper's equations in numpy float64, sharing no code with the package: top-k of |x|
    per token (Eq. 3), absmax int8 (Eq. 5-7), absmean ternary levels (Eq. 9-10), an int64 product, both
    scales applied at the end. Returns (q int64 [M, D], y float64 [M, out])."""
    x, wf = np.asarray(x, np.float64).reshape(-1, x.shape[-1]), np.asarray(wf, np.float64)
    if k is not None:
        cut = np.sort(np.abs(x), axis=-1)[:, -k][:, None]
        x = np.where(np.abs(x) >= cut, x, 0.0)  # random floats: no ties at the threshold
    s = 127.0 / np.maximum(np.abs(x).max(-1, keepdims=True), 1e-5)
    q = np.clip(np.round(x * s), -128, 127).astype(np.int64)
    return q, (q @ _numpy_levels(wf)) * max(np.abs(wf).mean(), 1e-5) / s


def _numpy_levels(wf):
    """BitNet's absmean ternary levels (Eq. 9-10) of a float weight, in numpy int64."""
    wf = np.asarray(wf, np.float64)
    return np.clip(np.round(wf / max(np.abs(wf).mean(), 1e-5)), -1, 1).astype(np.int64)


def _matmul(q, w, out_init=None, **kw):
    return kp.planes_to_columns(kp.matmul(q, w.data, bits=w.bits, interpret=True, out_init=out_init, **TILES, **kw),
                                w.out_features)


def _gather(q, w, rows, out_init=None, **kw):
    idx, count = ref.kept_rows(q, rows)
    qg = ref.gather_columns(q, idx, count)
    acc = kp.gather_matmul(count[None], idx, qg, w.data, bits=w.bits, interpret=True, out_init=out_init, **TILES, **kw)
    return kp.planes_to_columns(acc, w.out_features)


shapes = dict(m=st.integers(1, 40), d=st.integers(8, 150), n=st.integers(1, 45), bits=st.sampled_from([2, 1.6]),
              seed=st.integers(0, 2**31))


@settings(max_examples=3)
@given(**shapes, keep=st.floats(0.1, 1.0))
# explicit non-trivial draws of both packings (the derandomized draws start at m=1, d=8, n=1)
@example(m=5, d=130, n=33, bits=1.6, seed=1, keep=0.4)
@example(m=17, d=97, n=41, bits=2, seed=2, keep=0.7)
def test_matmul_kernel_equals_reference_accumulator(m, d, n, bits, seed, keep):
    wf, w = _w(seed, d, n, bits)
    q, _ = ref.quantize_input(_x(seed, m, d), max(1, int(keep * d)))
    out = _matmul(q, w, out_init=_poison(m, d, n, bits))
    np.testing.assert_array_equal(out, ref.accumulate_reference(q, w))
    np.testing.assert_array_equal(out, np.asarray(q, np.int64) @ _numpy_levels(wf))


@settings(max_examples=3)
@given(**shapes, keep=st.floats(0.05, 0.9))
@example(m=3, d=130, n=33, bits=1.6, seed=3, keep=0.3)
@example(m=2, d=97, n=41, bits=2, seed=4, keep=0.5)
def test_gather_kernel_reads_kept_rows_and_equals_reference(m, d, n, bits, seed, keep):
    m = 1 + m % DECODE_MAX_TOKENS
    k = max(1, int(keep * d))
    wf, w = _w(seed, d, n, bits)
    q, _ = ref.quantize_input(_x(seed, m, d), k)
    expect = ref.accumulate_reference(q, w)
    np.testing.assert_array_equal(expect, np.asarray(q, np.int64) @ _numpy_levels(wf))
    np.testing.assert_array_equal(_gather(q, w, min(d, m * k), out_init=_poison(m, d, n, bits)), expect)
    np.testing.assert_array_equal(ref.accumulate_gathered(q, w, min(d, m * k)), expect)


def test_gather_kernel_ignores_rows_that_are_not_kept():
    # poison every packed row no token keeps: the result must not change
    _, w = _w(7, 96, 30)
    q, _ = ref.quantize_input(_x(7, 2, 96), 20)
    dropped = ~np.asarray(jnp.any(q != 0, axis=0))
    bad = w.data.at[dropped].set(0)  # all codes 0 = level −1 where the true level may be 0 or +1
    assert not np.array_equal(bad, w.data)
    w_bad = type(w)(bad, w.scale, w.out_features, w.bits)
    np.testing.assert_array_equal(_gather(q, w_bad, 40), ref.accumulate_reference(q, w))


def _skips_first_column_tile(*refs, bits):
    """The matmul kernel with a bug: it never writes the first column tile."""
    first = pl.program_id(2) == 0

    @pl.when(pl.program_id(1) != 0)
    def _():
        kp._matmul_step(first, *refs, bits=bits)


def test_poisoned_output_catches_an_unwritten_tile():
    _, w = _w(3, 64, 40)
    q, _ = ref.quantize_input(_x(3, 5, 64), 30)
    broken = _matmul(q, w, out_init=_poison(5, 64, 40, 2), kernel=_skips_first_column_tile)
    assert (np.asarray(broken) == SENTINEL).any()
    assert not np.array_equal(broken, ref.accumulate_reference(q, w))


@settings(max_examples=5, deadline=None)
@given(m=st.integers(1, 12), d=st.integers(1, 300), keep=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
@example(m=3, d=200, keep=0.3, seed=1)
@example(m=8, d=300, keep=0.05, seed=2)  # most features dropped: the sort's padding is most of the list
def test_kept_rows_by_one_sort_equal_nonzero_and_the_column_gather(m, d, keep, seed):
    """The TPU path lists the kept features and gathers their columns in one stable sort
    (``kept_rows_sorted``); CPU and GPU by ``jnp.nonzero`` and a gather: the first ``count`` indices are the
    features some token keeps, ascending, in both, and the gathered int8 columns are equal bit for bit
    (the sort's padding columns are features no token keeps: zeros, like the masked gather's)."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(np.where(rng.random((m, d)) < keep, rng.integers(-127, 128, (m, d)), 0).astype(np.int8))
    rows = min(d, m * max(1, int(keep * d)))
    want = np.flatnonzero(np.asarray(q != 0).any(axis=0))[:rows]
    idx, count = ref.kept_rows(q, rows)
    sidx, scount, sqg = ref.kept_rows_sorted(q, rows)
    n = int(count)
    assert n == int(scount) == np.count_nonzero(np.asarray(q).any(0)) and sidx.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(idx)[:n], want)
    np.testing.assert_array_equal(np.asarray(sidx)[:n], want)
    assert ((0 <= np.asarray(sidx)) & (np.asarray(sidx) < d)).all()
    np.testing.assert_array_equal(sqg, ref.gather_columns(q, idx, count))


@settings(max_examples=3)
@given(**shapes, keep=st.floats(0.05, 1.0), chunk=st.sampled_from([4, 16, 128]))
def test_cpu_chunked_float32_formulation_is_exact(m, d, n, bits, seed, keep, chunk):
    k = max(1, int(keep * d))
    _, w = _w(seed, d, n, bits)
    q, _ = ref.quantize_input(_x(seed, m, d), k)
    expect = ref.accumulate_reference(q, w)
    np.testing.assert_array_equal(ref.accumulate_chunked(q, w, chunk=chunk), expect)
    np.testing.assert_array_equal(ref.accumulate_chunked(q, w, *ref.kept_rows(q, min(d, m * k)), chunk=chunk), expect)


@pytest.mark.parametrize("impl,m,bits", [
    ("xla", 1, 2), ("xla", 3, 1.6), ("xla", DECODE_MAX_TOKENS + 5, 2),   # gather and int8 GEMM paths
    ("interpret", 1, 1.6), ("interpret", DECODE_MAX_TOKENS + 5, 2),       # gather kernel and matmul kernel
    ("interpret", DECODE_MAX_TOKENS + 5, 1.6),                            # the batched kernel on 1.6-bit planes
])
def test_qsparse_matmul_equals_reference_within_float32_rounding(impl, m, bits):
    d, n, k = 200, 37, 70
    x = _x(m, 2, m, d)[0]
    wf, w = _w(m, d, n, bits)
    q, s = ref.quantize_input(x, k)
    expect = ref.scale_output(ref.accumulate_reference(q, w), s, w.scale)
    y = qsparse_matmul(x, w, k=k, impl=impl)
    np.testing.assert_allclose(y, expect, rtol=3e-7, atol=0)
    # and an independent numpy reference (the package's reference shares the unpacking with the kernels)
    q_np, y_np = _numpy_y(x, wf, k)
    np.testing.assert_array_equal(np.asarray(q, np.int64), q_np)
    np.testing.assert_allclose(y, y_np, rtol=2e-6, atol=1e-6 * np.abs(y_np).max())


def _fake_quant_bound(xs, wf):
    """Float32 dot error bound ``D · u · Σ|x̃_i||w_i|`` for the training forward's float sum."""
    return xs.shape[-1] * 2.0 ** -24 * (jnp.abs(xs) @ jnp.abs(quantize_weights(wf))) + 1e-30


@pytest.mark.parametrize("k,block_size,impl", [(None, None, "xla"), (55, None, "xla"), (8, 16, "xla"),
                                                (55, None, "interpret")])
def test_equals_training_fake_quant_forward(k, block_size, impl):
    # y = (Σ q·t) / (s·s_w) vs Σ (q/s)(t/s_w): the same sum, rounded differently
    x, (wf, w) = _x(11, 2, 6, 128), _w(11, 128, 50)
    xs = x if k is None else topk_sparsify(x, k, block_size=block_size)
    fake = quantize_activations(xs) @ quantize_weights(wf)
    y = qsparse_matmul(x, w, k=k, block_size=block_size, impl=impl)
    assert y.shape == (2, 6, 50) and y.dtype == jnp.float32
    assert (jnp.abs(y - fake) <= _fake_quant_bound(quantize_activations(xs), wf)).all()


def test_block_qsparse_uses_n_of_every_m():
    x, (_, w) = _x(12, 20, 64), _w(12, 64, 24)
    q, s = ref.quantize_input(x, 4, 16)
    assert (np.asarray(q != 0).reshape(20, 4, 16).sum(-1) <= 4).all()
    expect = ref.scale_output(ref.accumulate_reference(q, w), s, w.scale)
    np.testing.assert_allclose(qsparse_matmul(x, w, k=4, block_size=16, impl="interpret"), expect, rtol=3e-7)


@pytest.mark.parametrize("m", [1, 3])  # the dense one-row (chunked float32) and int8 GEMM paths
def test_k_equal_to_d_is_dense(m):
    x, (wf, w) = _x(13, m, 40), _w(13, 40, 9)
    _, expect = _numpy_y(x, wf, None)
    np.testing.assert_allclose(qsparse_matmul(x, w, k=40), expect, rtol=2e-6, atol=1e-6 * np.abs(expect).max())
    np.testing.assert_array_equal(qsparse_matmul(x, w, k=40), qsparse_matmul(x, w, k=None))


def test_auto_is_xla_on_cpu():
    x, (_, w) = _x(14, 2, 48), _w(14, 48, 10)
    assert jax.default_backend() == "cpu"
    np.testing.assert_array_equal(qsparse_matmul(x, w, k=20), qsparse_matmul(x, w, k=20, impl="xla"))


def test_runs_under_jit_with_the_packed_weight_as_argument():
    x, (_, w) = _x(15, 2, 48), _w(15, 48, 10)
    f = jax.jit(lambda x, w: qsparse_matmul(x, w, k=20))
    np.testing.assert_array_equal(f(x, w), qsparse_matmul(x, w, k=20))


def test_gradient_is_straight_through_and_packed_weight_gets_none():
    x, g = _x(16, 4, 64), _x(17, 4, 20)
    wf, w = _w(16, 64, 20)
    y, vjp = jax.vjp(lambda x: qsparse_matmul(x, w, k=16, impl="interpret"), x)
    (dx,) = vjp(g)
    np.testing.assert_allclose(dx, g @ dequantize(w).T, rtol=1e-6, atol=1e-6)  # STE: top-K, int8, ternary
    dw = jax.grad(lambda w: qsparse_matmul(x, w, k=16).sum(), allow_int=True)(w)
    assert float(dw.scale) == 0.0 and dw.data.dtype == jax.dtypes.float0


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), r"k must be None \(dense\) or an integer in \[1, 64\]"),
    (dict(k=65), r"in \[1, 64\]"),
    (dict(k=2.5), r"k must be"),
    (dict(k=20, block_size=16), r"in \[1, 16\] \(kept per block\)"),
    (dict(k=4, block_size=24), "block_size must be None or a positive divisor of in_features 64"),
    (dict(k=4, impl="cuda"), r"impl must be one of \('auto', 'xla', 'pallas', 'interpret'\)"),
    (dict(k=4, impl="pallas"), "impl='pallas' needs a gpu or tpu backend, this one is cpu"),
])
def test_bad_arguments_raise_one_line_errors(kwargs, match):
    x, (_, w) = _x(18, 2, 64), _w(18, 64, 8)
    with pytest.raises(ValueError, match=match) as e:
        qsparse_matmul(x, w, **kwargs)
    assert "\n" not in str(e.value)


def test_bad_operands_raise_one_line_errors():
    wf, w = _w(19, 64, 8)
    for x, ww, match in [
        (_x(19, 2, 32), w, "x has 32 input features but w has in_features=64"),
        (jnp.ones((2, 64), jnp.int32), w, "x must be a float array"),
        (_x(19, 2, 64), wf, "w must be a PackedTernary"),
        (_x(19, 2, 64), type(w)(w.data.astype(jnp.int8), w.scale, 8, 2), "w.data must be uint8"),
        (_x(19, 2, 64), type(w)(w.data, w.scale, 30, 2), "out_features=30 needs at least 8"),
    ]:
        with pytest.raises(ValueError, match=match) as e:
            qsparse_matmul(x, ww, k=10)
        assert "\n" not in str(e.value)
    assert IMPLS == ("auto", "xla", "pallas", "interpret")


@pytest.mark.parametrize("platform,kernel", [("cuda", "matmul"), ("cuda", "gather"), ("tpu", "matmul")])
def test_kernels_lower_for_gpu_triton_and_tpu_mosaic(platform, kernel):
    """Lowering only (no device here): Pallas → Triton IR for CUDA, → Mosaic for TPU."""
    _, w = _w(20, 1024, 1000)
    target = "gpu" if platform == "cuda" else platform
    if kernel == "matmul":
        f, args = functools.partial(kp.matmul, bits=2, target=target), (jnp.ones((32, 1024), jnp.int8), w.data)
    else:
        f = functools.partial(kp.gather_matmul, bits=2, target=target)
        args = (jnp.array([400], jnp.int32), jnp.arange(400, dtype=jnp.int32), jnp.ones((1, 400), jnp.int8), w.data)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert ("tpu_custom_call" if platform == "tpu" else "xla.gpu.triton") in text
