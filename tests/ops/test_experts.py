"""LTE's experts (ops/experts.py): balanced k-means groups every FFN neuron into exactly one expert of equal size."""

import numpy as np

from qsparse_jax.ops.experts import balanced_kmeans, experts_of, group_experts


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
