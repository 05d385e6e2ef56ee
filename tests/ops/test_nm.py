"""N:M weight sparsity math (AST and its one-shot baselines): masks, scores, SLoRB, decay.

SparseGPT: ``tests/ops/test_sparsegpt.py``; calibration and one-shot pruning of a model:
``tests/transforms/test_calibration.py``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from qsparse_jax.ops import nm as ws


def reference_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """numpy: per output feature and group of m consecutive inputs keep the n largest, ties to the lower index."""
    *lead, d_in, d_out = scores.shape
    g = np.moveaxis(scores.reshape(*lead, d_in // m, m, d_out), -2, -1)  # [..., G, out, m]
    order = np.argsort(-g, axis=-1, kind="stable")[..., :n]
    keep = np.zeros(g.shape, bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return np.moveaxis(keep, -1, -2).reshape(scores.shape)


@st.composite
def weights(draw):
    """[in, out] or [L, in, out] weights, 0 < n < m: mostly normal floats (all non-zero), some heavily tied
    small integers (numpy draws from a hypothesis seed: hypothesis' own float arrays are mostly zeros)."""
    m = draw(st.sampled_from([2, 4, 8]))
    n = draw(st.integers(1, m - 1))
    shape = (*draw(st.sampled_from([(), (2,)])), m * draw(st.integers(1, 4)), draw(st.integers(1, 5)))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    if draw(st.sampled_from(["random", "random", "random", "tied"])) == "tied":
        w = rng.integers(-2, 3, shape).astype(np.float32)
    else:
        w = rng.normal(size=shape).astype(np.float32)
    return w, n, m


@given(weights())
@example((np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32), 2, 4))  # 2:4, the AST pattern
def test_exactly_n_of_every_m_kept_for_random_and_tied_weights(case):
    w, n, m = case
    mask = np.asarray(ws.nm_mask(jnp.abs(jnp.asarray(w)), n, m))
    *lead, d_in, d_out = w.shape
    assert mask.shape == w.shape and mask.dtype == bool
    assert np.all(mask.reshape(*lead, d_in // m, m, d_out).sum(-2) == n)
    # the kept ones are the n largest |w| of their group, ties to the lower input index
    np.testing.assert_array_equal(mask, reference_mask(np.abs(w), n, m))


def test_all_zero_weights_still_keep_exactly_n_per_group():
    mask = np.asarray(ws.nm_mask(jnp.zeros((8, 3)), 2, 4))
    assert np.all(mask.reshape(2, 4, 3).sum(-2) == 2) and mask[:2].all() and not mask[2:4].any()


def test_magnitude_keeps_the_two_largest_of_each_group_of_four_along_the_input_axis():
    w = np.array([[0.1, -5.0], [-3.0, 0.2], [2.0, 0.3], [0.0, 4.0],
                  [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]], np.float32)  # [in=8, out=2]
    mask = np.asarray(ws.nm_mask(ws.magnitude_score(w)))
    np.testing.assert_array_equal(mask[:4, 0], [False, True, True, False])
    np.testing.assert_array_equal(mask[:4, 1], [True, False, False, True])
    np.testing.assert_array_equal(mask[4:, 0], [True, True, False, False])  # all tied: the first two
    stacked = np.stack([w, -w[::-1]])  # [L, in, out]: each layer on its own
    np.testing.assert_array_equal(np.asarray(ws.nm_mask(ws.magnitude_score(stacked)))[0], mask)
    assert float(ws.group_zero_fraction(mask, 4)) == 0.5
    assert float(ws.group_zero_fraction(np.where(mask, w, 0), 4)) == 0.5


def test_nm_mask_rejects_inputs_not_divisible_by_m_and_is_jittable():
    with pytest.raises(ValueError, match="multiple of m"):
        ws.nm_mask(jnp.ones((6, 3)), 2, 4)
    w = jax.random.normal(jax.random.key(0), (3, 16, 8))
    np.testing.assert_array_equal(jax.jit(ws.nm_mask)(w), ws.nm_mask(w))


def test_wanda_score_is_abs_weight_times_input_feature_norm():
    rng = np.random.default_rng(0)
    w, x = rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(50, 8)).astype(np.float32)
    norm = np.linalg.norm(x, axis=0)
    want = np.array([[abs(w[j, o]) * np.sqrt(np.sum(x[:, j] ** 2)) for o in range(3)] for j in range(8)])
    np.testing.assert_allclose(np.asarray(ws.wanda_score(w, norm)), want, rtol=1e-6)


def test_slorb_output_is_the_explicit_formula_and_init_the_group_means():
    rng = np.random.default_rng(2)
    d_in, d_out, k = 32, 5, 8
    w = rng.normal(size=(d_in, d_out)).astype(np.float32)
    mask = np.asarray(ws.nm_mask(np.abs(w)))
    S = np.asarray(ws.slorb_init(w, mask, k))
    assert S.shape == (d_in // k, d_out)
    for g in range(d_in // k):
        for o in range(d_out):
            rows = slice(g * k, (g + 1) * k)
            np.testing.assert_allclose(S[g, o], np.mean(np.where(mask[rows, o], 0, w[rows, o])), rtol=1e-6)
    x = rng.normal(size=(2, 3, d_in)).astype(np.float32)
    block_of_ones = np.kron(np.eye(d_in // k), np.ones((1, k)))  # X: [in/k, in]
    np.testing.assert_allclose(np.asarray(ws.slorb_apply(x, S, k)), (x @ block_of_ones.T) @ S, rtol=1e-5, atol=1e-6)
    xw = rng.normal(size=(d_in // k, d_in)).astype(np.float32)  # a trained X: the full [in/k, in] projection
    want = np.einsum("bsj,gj,go->bso", x, xw, S)
    np.testing.assert_allclose(np.asarray(ws.slorb_apply(x, S, k, xw)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ws.slorb_x_init(d_in, k)), block_of_ones)  # X starts as the group sum
    np.testing.assert_allclose(np.asarray(ws.slorb_apply(x, S, k, ws.slorb_x_init(d_in, k))),
                               np.asarray(ws.slorb_apply(x, S, k)), rtol=1e-6, atol=1e-6)
    # equal inputs inside a group: S·(Xx) is exactly the pruned weights' contribution
    xc = np.repeat(rng.normal(size=(4, d_in // k)), k, axis=1).astype(np.float32)
    np.testing.assert_allclose(np.asarray(ws.slorb_apply(xc, S, k)), xc @ np.where(mask, 0, w), rtol=1e-4, atol=1e-5)
    assert ws.slorb_param_count(d_in, d_out, k) == S.size
    assert ws.slorb_param_count(d_in, d_out, k, trainable_x=True) == S.size + xw.size


def test_decay_moves_only_pruned_weights_with_the_annealed_lambda():
    assert float(ws.decay_lambda(0)) == 0.0
    np.testing.assert_allclose([float(ws.decay_lambda(t)) for t in (1500, 3000, 10_000)], [3e-5, 6e-5, 6e-5], rtol=1e-6)
    rng = np.random.default_rng(3)
    w = rng.normal(size=(8, 4)).astype(np.float32)
    mask = np.asarray(ws.nm_mask(np.abs(w)))
    g = np.asarray(ws.decayed_grad(jnp.zeros_like(w), w, mask, 0.5))
    np.testing.assert_array_equal(g[mask], 0)
    np.testing.assert_allclose(g[~mask], 0.5 * w[~mask])
    w_new = w - 0.1 * g  # one SGD step on a zero loss gradient: pruned weights shrink, kept ones stay
    np.testing.assert_array_equal(w_new[mask], w[mask])
    assert np.all(np.abs(w_new[~mask]) < np.abs(w[~mask]))


def test_flip_rate_counts_changed_positions():
    old = np.array([[True], [True], [False], [False]])
    new = np.array([[True], [False], [True], [False]])
    assert float(ws.flip_rate(old, new)) == 0.5 and float(ws.flip_rate(old, old)) == 0.0
