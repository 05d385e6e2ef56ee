"""Top-K sparsification (Q-Sparse Eq. 2–3, 12–13) and Block Q-Sparse (N:M)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qsparse_jax.ops import topk as T
from qsparse_jax.ops.topk import keep_count, topk_mask, topk_sparsify
from qsparse_jax.testing.fixtures import cpu_env


def reference_mask(x: np.ndarray, k: int) -> np.ndarray:
    """Numpy Top_k(|x|) per row: largest magnitude first, lowest index first among ties."""
    order = np.argsort(-np.abs(x), axis=-1, kind="stable")[..., :k]
    mask = np.zeros(x.shape, bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return mask


shapes = st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 70))


@given(shape=shapes, seed=st.integers(0, 2**16), frac=st.floats(0.01, 1.0))
def test_exactly_k_kept_per_row_and_they_are_the_largest(shape, seed, frac):
    x = np.asarray(jax.random.normal(jax.random.key(seed), shape))
    k = max(1, int(frac * shape[-1]))
    y = np.asarray(topk_sparsify(jnp.asarray(x), k))
    mask = np.asarray(topk_mask(jnp.asarray(x), k))
    assert (mask.sum(-1) == k).all()
    np.testing.assert_array_equal(mask, reference_mask(x, k))
    np.testing.assert_array_equal(y, np.where(mask, x, 0))
    if k < shape[-1]:
        assert (np.where(mask, np.abs(x), np.inf).min(-1) >= np.where(mask, -np.inf, np.abs(x)).max(-1)).all()


def test_many_rows_on_cpu_are_searched_in_independent_groups_with_the_same_mask():
    """Compiled for CPU with no mesh, 256+ rows are searched in ``CPU_ROW_SPLITS`` groups (XLA:CPU runs the
    groups' loops concurrently); the mask is still exact top-K per row, ties to the lowest index."""
    rng = np.random.default_rng(5)
    x = (rng.integers(0, 6, (512, 96)) * rng.choice([-1.0, 1.0], (512, 96))).astype(np.float32)  # many ties
    x[::7] = rng.normal(size=(74, 96))
    k = 40
    np.testing.assert_array_equal(topk_mask(jnp.asarray(x), k), reference_mask(x, k))
    loops = lambda f: jax.jit(f).lower(jnp.asarray(x)).as_text().count("stablehlo.while")
    whole = loops(lambda x: T._rows_search(x, k, False, None))
    assert T.CPU_ROW_SPLITS >= 2 and loops(lambda x: topk_mask(x, k)) >= T.CPU_ROW_SPLITS * whole > 0


@given(rows=st.integers(1, 6), blocks=st.integers(1, 5), m=st.sampled_from([2, 4, 8, 32]),
       seed=st.integers(0, 2**16), frac=st.floats(0.01, 1.0))
def test_block_keeps_n_per_block_of_m(rows, blocks, m, seed, frac):
    x = np.asarray(jax.random.normal(jax.random.key(seed), (rows, blocks * m)))
    n = max(1, int(frac * m))
    mask = np.asarray(topk_mask(jnp.asarray(x), n, block_size=m))
    per_block = mask.reshape(rows, blocks, m)
    assert (per_block.sum(-1) == n).all()
    np.testing.assert_array_equal(per_block, reference_mask(x.reshape(rows, blocks, m), n))


@given(seed=st.integers(0, 2**16), d=st.integers(2, 64), levels=st.integers(1, 4))
def test_ties_break_to_lowest_index_with_exactly_k(seed, d, levels):
    # few distinct magnitudes, random signs: most rows tie at the threshold
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, levels, (5, d)) * rng.choice([-1, 1], (5, d))).astype(np.float32)
    for k in {1, d // 2 or 1, d - 1 or 1, d}:
        mask = np.asarray(topk_mask(jnp.asarray(x), k))
        np.testing.assert_array_equal(mask, reference_mask(x, k))


def test_bfloat16_and_jit():
    x = jax.random.normal(jax.random.key(1), (3, 40), jnp.bfloat16)
    y = jax.jit(lambda x: topk_sparsify(x, 10))(x)
    assert y.dtype == jnp.bfloat16
    assert (np.asarray(y != 0).sum(-1) == 10).all()
    np.testing.assert_array_equal(np.asarray(y != 0), reference_mask(np.asarray(x, np.float32), 10))


def test_ste_gradient_is_identity():
    x = jax.random.normal(jax.random.key(2), (4, 33))
    g = jax.random.normal(jax.random.key(3), (4, 33))
    _, vjp = jax.vjp(lambda x: topk_sparsify(x, 7), x)
    np.testing.assert_array_equal(vjp(g)[0], g)


def test_masked_gradient_is_cotangent_times_mask():
    x = jax.random.normal(jax.random.key(4), (4, 32))
    g = jax.random.normal(jax.random.key(5), (4, 32))
    for bs in (None, 8):
        _, vjp = jax.vjp(lambda x: topk_sparsify(x, 3, block_size=bs, grad="masked"), x)
        np.testing.assert_array_equal(vjp(g)[0], g * topk_mask(x, 3, block_size=bs))


def test_l2_preserve_rescale_keeps_row_norm():
    x = jax.random.normal(jax.random.key(6), (5, 48))
    y = topk_sparsify(x, 12, rescale="l2_preserve")
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_array_equal(y != 0, topk_mask(x, 12))
    np.testing.assert_array_equal(topk_sparsify(x, 12), jnp.where(topk_mask(x, 12), x, 0))  # default: no rescale


def test_keep_count_formula_and_validation():
    assert keep_count(1024, 0.3) == int(0.7 * 1024)
    assert keep_count(32, 0.5) == 16
    assert keep_count(10, 0.0) == 10
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            keep_count(10, bad)
    with pytest.raises(ValueError, match="keeps no entry"):
        keep_count(4, 0.9)
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        keep_count(0, 0.5)


@pytest.mark.parametrize("kw,msg", [
    (dict(k=0), r"k must be an integer in \[1, 12\]"),
    (dict(k=13), r"k must be an integer in \[1, 12\]"),
    (dict(k=2, block_size=5), "block_size must be a positive divisor"),
    (dict(k=5, block_size=4), r"k must be an integer in \[1, 4\]"),
    (dict(k=2, rescale="l1"), "rescale must be one of"),
    (dict(k=2, grad="vanilla"), "grad must be one of"),
])
def test_bad_arguments_raise_one_line(kw, msg):
    with pytest.raises(ValueError, match=msg) as e:
        topk_sparsify(jnp.ones((2, 12)), **kw)
    assert "\n" not in str(e.value)


def test_works_when_feature_axis_is_sharded():
    """Selection is reductions only, so a feature axis split over devices needs no gather or sort."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from qsparse_jax.ops.topk import topk_sparsify
        mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tensor"))
        x = jax.random.normal(jax.random.key(0), (8, 64))
        xs = jax.device_put(x, NamedSharding(mesh, P("data", "tensor")))
        f = jax.jit(lambda x: topk_sparsify(x, 5, block_size=16) + topk_sparsify(x, 11))
        g = jax.jit(jax.grad(lambda x: jnp.sum(topk_sparsify(x, 11, grad="masked") ** 2)))
        want_f, want_g = f(x), g(x)
        np.testing.assert_array_equal(f(xs), want_f)
        np.testing.assert_array_equal(g(xs), want_g)
        # explicit-axis mode, where lax.top_k over a sharded axis is an error
        from jax.sharding import AxisType
        emesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Explicit,) * 2)
        with jax.set_mesh(emesh):
            xe = jax.device_put(x, NamedSharding(emesh, P("data", "tensor")))
            np.testing.assert_array_equal(f(xe), want_f)
            np.testing.assert_array_equal(g(xe), want_g)
        print("ok")
    """)
    env = cpu_env(8)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@given(seed=st.integers(0, 2**16), d=st.integers(2, 64), zero_frac=st.sampled_from([0.3, 0.6, 0.9]),
       frac=st.floats(0.05, 1.0))
def test_relu_like_inputs_with_many_zeros_give_the_exact_top_k_values(seed, d, zero_frac, frac):
    """The STE forward skips breaking ties among zeros (same values); the masked path stays exact."""
    rng = np.random.default_rng(seed)
    x = np.where(rng.random((6, d)) < zero_frac, 0.0, rng.normal(size=(6, d)) ** 2).astype(np.float32)
    k = max(1, int(frac * d))
    want = np.where(reference_mask(x, k), x, 0)
    np.testing.assert_array_equal(topk_sparsify(jnp.asarray(x), k), want)
    np.testing.assert_array_equal(topk_sparsify(jnp.asarray(x), k, grad="masked"), want)
    assert (np.asarray(topk_mask(jnp.asarray(x), k)).sum(-1) == k).all()


@given(seed=st.integers(0, 2**31), d=st.integers(2, 300), ways=st.sampled_from([2, 3, 16]), frac=st.floats(0.01, 1.0))
def test_every_search_width_finds_the_kth_largest_magnitude(seed, d, ways, frac):
    """The WAYS-ary threshold search (8 passes on accelerators, binary on CPU) is exact at any width:
    forced here on CPU, its threshold is the k-th largest |x| bit pattern (numpy's sort)."""
    x = np.random.default_rng(seed).normal(size=(5, d)).astype(np.float32)
    k = max(1, int(frac * d))
    bits = jax.lax.bitcast_convert_type(jnp.abs(jnp.asarray(x)), jnp.int32)
    hi = jnp.max(bits, axis=-1, keepdims=True) + 1

    def count_ok(c):
        n = jnp.sum(bits[..., :, None] >= c[..., None, :], axis=-2)
        return jnp.sum(n >= k, axis=-1, keepdims=True, dtype=jnp.int32)

    t = T._search(count_ok, hi * 0, hi, 0x7F800001, ways)
    expect = np.sort(np.abs(x).view(np.int32), axis=-1)[:, d - k]
    np.testing.assert_array_equal(np.asarray(t)[:, 0], expect)
    assert T._passes(0x7F800001, 16) == 8 and T._passes(0x7F800001, 2) == 31


def test_search_passes_follow_the_platform_compiled_for_the_row_count_and_the_dtype():
    """Decode's few rows: 8 passes (16 ways) on accelerators, 31 (binary) on CPU. Many rows (training):
    binary on CPU and CUDA, 4 ways on TPU (16 float32 passes). A bf16 row searches its own 15-bit
    patterns: 15 binary passes, 8 at 4 ways. The loop's trip count is read from the lowered program."""
    f = jax.jit(lambda x: topk_mask(x, 300))
    few = jnp.ones((4, 1000), jnp.float32)
    many = jnp.ones((T.FEW_ROWS + 1, 1000), jnp.float32)
    cases = [("cuda", 8, few), ("cpu", 31, few), ("cuda", 31, many), ("cpu", 31, many), ("tpu", 16, many),
             ("cpu", 15, many.astype(jnp.bfloat16)), ("tpu", 8, many.astype(jnp.bfloat16))]
    for platform, passes, rows in cases:
        text = f.trace(rows).lower(lowering_platforms=(platform,)).as_text()
        found = f"constant dense<{passes}>" in text or f"constant({passes})" in text or f"= {passes} :" in text
        assert found, (platform, passes, rows.dtype)


@given(seed=st.integers(0, 2**16), rows=st.sampled_from([3, T.FEW_ROWS + 1]), d=st.integers(8, 300),
       frac=st.floats(0.05, 0.95), dtype=st.sampled_from(["bfloat16", "float16"]))
def test_sixteen_bit_rows_select_exactly_the_float32_top_k(seed, rows, d, frac, dtype):
    """Searching a 16-bit float's own bit pattern keeps the same entries as float32 (many ties: few
    distinct bf16 values), lowest index first, exactly k per row."""
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(rows, d)), dtype)
    k = max(1, int(frac * d))
    mask = np.asarray(topk_mask(x, k))
    np.testing.assert_array_equal(mask, reference_mask(np.asarray(x, np.float32), k))


def test_statistical_threshold_keeps_k_of_d_on_average_for_normal_rows():
    """|x| ≥ std · Φ⁻¹(1 − k/2d) keeps a fraction k/d of a centred normal row (Spark Transformer's
    statistical top-K for magnitudes): the mean over 512 rows of 4096 is within 0.5 % of it, and the
    kept entries are the row's largest magnitudes (a threshold, no gaps)."""
    x = jax.random.normal(jax.random.key(0), (512, 4096))
    for keep in (0.7, 0.4):
        k = int(keep * 4096)
        m = np.asarray(T.statistical_mask(x, k))
        assert abs(m.mean() - keep) < 0.005, (keep, m.mean())
        a = np.abs(np.asarray(x))
        assert (np.where(m, a, np.inf).min(-1) >= np.where(m, -np.inf, a).max(-1)).all()


def test_statistical_selection_has_the_straight_through_gradient():
    x = jax.random.normal(jax.random.key(1), (4, 256))
    g = jax.random.normal(jax.random.key(2), (4, 256))
    y, vjp = jax.vjp(jax.jit(lambda x: topk_sparsify(x, 64, select="statistical")), x)  # traced, as in a model
    np.testing.assert_array_equal(np.asarray(y), np.where(np.asarray(T.statistical_mask(x, 64)), np.asarray(x), 0))
    np.testing.assert_array_equal(vjp(g)[0], g)


def test_statistical_selection_refuses_blocks_and_rescale_in_one_line():
    x = jnp.ones((2, 64))
    for kw in ({"block_size": 32}, {"rescale": "l2_preserve"}, {"grad": "masked"}):
        with pytest.raises(ValueError, match="statistical"):
            topk_sparsify(x, 16, select="statistical", **kw)
