"""SparseGPT N:M pruning of one weight matrix from its input Hessian (OBS with error compensation).

Weights are ``[in, out]`` and N:M groups run along the input axis, as in ``ops/nm.py``.
"""

from __future__ import annotations

import numpy as np

from .nm import _check_groups


def sparsegpt_prune(w, H, n: int = 2, m: int = 4, blocksize: int = 128, percdamp: float = 0.01):
    """SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774, Alg. 1) N:M pruning of one layer:
    ``(w_pruned, mask)``, ``w_pruned`` in ``w``'s dtype with exactly ``n`` of every ``m`` kept.

    ``w``: ``[in, out]``; ``H = Σ x xᵀ`` ``[in, in]`` over the calibration inputs of this layer (any positive
    scale: the damping is relative). In the paper's ``[out, in]`` orientation ``W = wᵀ``: minimizing
    ``‖W X − Ŵ X‖²`` row by row with the OBS update. Steps (numpy, float64):

    1. dead inputs (``H_jj = 0``) get ``H_jj = 1`` (their weights stay, as nothing measures them);
    2. damping ``H += percdamp · mean(diag H) · I``; ``U = chol(H⁻¹)ᵀ`` (upper Cholesky factor of the inverse);
    3. columns (inputs) in blocks of ``blocksize``; at the first column of each group of ``m`` the mask keeps
       the ``n`` largest ``W_j² / U_jj²`` (the OBS saliency), ties to the lower index like :func:`nm_mask`;
    4. each column ``j`` is zeroed where pruned, its error ``e = (W_j − Ŵ_j) / U_jj`` is pushed onto the block's
       later columns, ``W_{j:} −= e · U_{j, j:}``, and after the block onto every later column (lazy batch).

    Follows the authors' ``SparseGPT.fasterprune`` (github.com/IST-DASLab/sparsegpt, ``sparsegpt.py``), written
    anew; two differences: dead inputs keep their weights (the authors zero them, which can leave a group
    with fewer than ``n`` nonzeros), and ties in the saliency go to the lower index (``torch.topk``'s order).
    """
    w = np.asarray(w)
    _check_groups(w.shape, m, "w")
    if w.ndim != 2:
        raise ValueError(f"sparsegpt_prune takes one layer's [in, out] weight, got shape {w.shape}")
    if blocksize % m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of m={m}")
    d_in = w.shape[0]
    H = np.array(H, np.float64, copy=True)
    if H.shape != (d_in, d_in):
        raise ValueError(f"H must be [{d_in}, {d_in}] for a weight of shape {w.shape}, got {H.shape}")
    W = w.astype(np.float64).T.copy()  # [out, in], the paper's orientation
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    H[np.diag_indices(d_in)] += percdamp * np.mean(np.diag(H))
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # U, upper triangular with H⁻¹ = Uᵀ U
    keep = np.zeros_like(W, dtype=bool)
    for b0 in range(0, d_in, blocksize):
        b1 = min(b0 + blocksize, d_in)
        W1, U1 = W[:, b0:b1].copy(), Hinv[b0:b1, b0:b1]
        Err1 = np.zeros_like(W1)
        for i in range(b1 - b0):
            if i % m == 0:
                sal = W1[:, i:i + m] ** 2 / np.diag(U1)[i:i + m][None, :] ** 2
                keep[:, b0 + i:b0 + i + m] = _nm_rows(sal, n)
            d = U1[i, i]
            q = np.where(keep[:, b0 + i], W1[:, i], 0.0)
            err = (W1[:, i] - q) / d
            W1[:, i:] -= np.outer(err, U1[i, i:])
            W1[:, i] = q
            Err1[:, i] = err
        W[:, b0:b1] = W1
        W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]
    W = np.where(keep, W, 0.0)
    return W.T.astype(w.dtype), keep.T


def _nm_rows(scores: np.ndarray, n: int) -> np.ndarray:
    """numpy: per row of ``scores`` [rows, m] keep the ``n`` largest, ties to the lower index (as nm_mask)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :n]
    keep = np.zeros(scores.shape, bool)
    np.put_along_axis(keep, order, True, axis=1)
    return keep


def reconstruction_error(w, w_hat, X) -> float:
    """``‖(W − Ŵ)ᵀ Xᵀ‖_F`` for ``X`` ``[tokens, in]``: how far the pruned layer's outputs are from the dense ones."""
    X = np.asarray(X, np.float64)
    return float(np.linalg.norm(X @ (np.asarray(w, np.float64) - np.asarray(w_hat, np.float64))))

