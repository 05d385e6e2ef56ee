"""SparseGPT: one-shot N:M pruning with optimal-brain-surgeon compensation of the kept weights."""

import numpy as np

from qsparse_jax.ops.nm import nm_mask, wanda_score
from qsparse_jax.ops.sparsegpt import reconstruction_error, sparsegpt_prune


def test_sparsegpt_reconstructs_better_than_wanda_on_the_same_calibration_data():
    rng = np.random.default_rng(1)
    d_in, d_out, tokens = 64, 32, 512
    x = rng.normal(size=(tokens, d_in)) * rng.uniform(0.1, 3.0, size=d_in)
    x[:, :16] += 0.8 * x[:, 16:32]  # correlated inputs: what OBS compensation exploits
    w = rng.normal(size=(d_in, d_out)).astype(np.float32)
    w_sgpt, mask = sparsegpt_prune(w, x.T @ x, n=2, m=4, blocksize=32)
    w_wanda = np.where(np.asarray(nm_mask(wanda_score(w, np.linalg.norm(x, axis=0)))), w, 0)
    assert w_sgpt.dtype == w.dtype and np.array_equal(w_sgpt != 0, mask)
    assert np.all(mask.reshape(d_in // 4, 4, d_out).sum(1) == 2)
    err_sgpt, err_wanda = reconstruction_error(w, w_sgpt, x), reconstruction_error(w, w_wanda, x)
    assert err_sgpt < 0.9 * err_wanda, (err_sgpt, err_wanda)
