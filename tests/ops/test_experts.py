"""LTE's experts (ops/experts.py): balanced k-means groups every FFN neuron into exactly one expert of equal size;
the selected (token, expert) pairs, sorted by expert and run as a grouped matmul, give the dense FFN restricted to
each token's experts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse_jax.ops.experts import balanced_kmeans, expert_rows, experts_of, group_experts, grouped_ffn


def test_every_neuron_in_exactly_one_expert_and_experts_equal_size():
    w = np.random.default_rng(0).normal(size=(24, 192)).astype(np.float32)
    perm = group_experts(w, 16, seed=3)
    experts = experts_of(perm, 16)
    assert experts.shape == (12, 16)
    assert sorted(experts.reshape(-1).tolist()) == list(range(192))  # a permutation: each neuron once
    labels = balanced_kmeans(w.T, 12)
    assert np.bincount(labels, minlength=12).tolist() == [16] * 12
    # planted clusters (4 directions, 32 noisy copies each, shuffled) are recovered exactly
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 24))
    truth = rng.permutation(np.repeat(np.arange(4), 32))
    planted = centres[truth] + 0.05 * rng.normal(size=(128, 24))
    found = balanced_kmeans(planted, 4, seed=0)
    assert all(len(set(found[truth == c])) == 1 for c in range(4))


# --- the selected experts as a grouped matmul ----------------------------------------------------------------

def _selection(T, E, seed):
    """Random selection, about half the experts per token; of three tokens or more, token 0 selects none, token 1 all."""
    sel = np.random.default_rng(seed).random((T, E)) < 0.5
    if T > 2:
        sel[0], sel[1] = False, True
    return jnp.asarray(sel)


@pytest.mark.parametrize("tile", [1, 3])
def test_pairs_sorted_by_expert_each_once_with_group_sizes_and_one_expert_per_tile(tile):
    sel = _selection(7, 5, 0)
    rows = expert_rows(sel, tile)
    tok, te = np.asarray(rows.token), np.asarray(rows.tile_expert)
    expert = np.repeat(te, tile)  # every row's expert: its tile's
    real = tok < 7
    pairs = sorted(zip(tok[real].tolist(), expert[real].tolist()))
    assert pairs == sorted(zip(*np.nonzero(np.asarray(sel))))  # each selected pair once, nothing else
    assert np.all(np.diff(expert[real]) >= 0)  # sorted by expert
    np.testing.assert_array_equal(rows.group_sizes, np.asarray(sel).sum(0))
    assert int(rows.n_tiles) == sum(-(-n // tile) for n in np.asarray(sel).sum(0).tolist())
    assert not real[int(rows.n_tiles) * tile:].any()  # the tiles past n_tiles are padding


def _restricted_dense(x, sel, wgu, wd, nw=None):
    """The dense GLU FFN with each token's unselected experts' neurons zeroed (SubLN: then scaled by nw
    and the RMS over the whole hidden vector); also the zero count of the down-projection input."""
    E, s = sel.shape[1], wgu.shape[-1]
    wg, wu = (wgu[i].transpose(1, 0, 2).reshape(x.shape[1], E * s) for i in (0, 1))
    h = jnp.where(jnp.repeat(sel, s, axis=-1), (x @ wu) * jax.nn.silu(x @ wg), 0.0)
    zeros = jnp.sum(h == 0)
    if nw is not None:
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), -1, keepdims=True) + 1e-6) * nw.reshape(-1)
    return h @ wd.reshape(E * s, -1), zeros


@pytest.mark.parametrize("tile", [None, 1, 4], ids=["ragged_dot", "tile1", "tile4"])
@pytest.mark.parametrize("T", [1, 9])
def test_grouped_matmul_is_the_dense_ffn_restricted_to_each_tokens_experts(tile, T):
    d, E, s, d_out = 16, 6, 4, 12
    k = jax.random.split(jax.random.key(T), 5)
    x = jax.random.normal(k[0], (T, d))
    wgu = jax.random.normal(k[1], (2, E, d, s)) * d ** -0.5
    wd = jax.random.normal(k[2], (E, s, d_out)) * (E * s) ** -0.5
    nw = 1 + 0.5 * jax.random.normal(k[3], (E, s))
    sel = _selection(T, E, T)
    f = jax.jit(lambda x, sel, nw: grouped_ffn(x, sel, wgu, wd, jax.nn.silu, tile=tile, norm_weight=nw))
    out, _, zeros = f(x, sel, None)
    want, want_zeros = _restricted_dense(x, sel, wgu, wd)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
    assert float(zeros) == float(want_zeros)
    out, ss, _ = f(x, sel, nw)  # SubLN: scaled neurons, the RMS finished from Σh² per token
    out = out * jax.lax.rsqrt(ss / (E * s) + 1e-6)[:, None]
    np.testing.assert_allclose(out, _restricted_dense(x, sel, wgu, wd, nw)[0], atol=1e-5, rtol=1e-5)
