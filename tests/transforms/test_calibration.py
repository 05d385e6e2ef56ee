"""Calibration on a model (each block linear's input norms and Hessians) and one-shot N:M pruning of every
block linear (magnitude, Wanda, SparseGPT)."""

import numpy as np
import pytest

from qsparse_jax.ops.nm import group_zero_fraction
from qsparse_jax.transforms.calibration import METHODS, calibrate, prune_model


def _tiny_model(scan_layers=False, seed=0):
    from flax import nnx

    from qsparse_jax import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, hidden_dim=64, activation="relu2",
                      max_seq_len=16, scan_layers=scan_layers)
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def test_calibration_records_each_linear_input_norm_and_hessian():
    from qsparse_jax.nn.layers import rms_norm

    model = _tiny_model()
    tokens = [np.random.default_rng(i).integers(0, 64, (2, 8)) for i in range(2)]
    stats = calibrate(model, tokens)
    assert len(stats) == 2 and set(stats[0]) == {("attn", "wq"), ("attn", "wk"), ("attn", "wv"), ("attn", "wo"),
                                                  ("mlp", "w_gate"), ("mlp", "w_up"), ("mlp", "w_down")}
    # layer 0's q/k/v input: the attention RMSNorm of the embeddings
    x = np.concatenate([np.asarray(rms_norm(model.embed[...][t], model.config.norm_eps,
                                            model.layers[0].attn_norm.weight[...])).reshape(-1, 32) for t in tokens])
    s = stats[0][("attn", "wk")]
    np.testing.assert_allclose(s["act_norm"], np.linalg.norm(x, axis=0), rtol=1e-5)
    np.testing.assert_allclose(s["H"], x.T.astype(np.float64) @ x, rtol=1e-4, atol=1e-4)
    assert s["tokens"] == 32 and stats[1][("mlp", "w_down")]["H"].shape == (64, 64)


LINEARS = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scan_layers", [False, True], ids=["layers", "scan"])
def test_prune_model_makes_every_block_linear_2_4_and_leaves_the_rest(method, scan_layers):
    from flax import nnx

    model = _tiny_model(scan_layers)
    before = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model))}
    tokens = [np.random.default_rng(0).integers(0, 64, (2, 16))]
    pruned, report = prune_model(model, method, tokens)
    assert len(report) == 7 * 2 and all(r["kept"] == 0.5 for r in report)
    if method != "magnitude":
        assert all(0 < r["rel_err"] < 1 for r in report)
    for k, v in nnx.to_flat_state(nnx.state(pruned)):
        a = np.asarray(v[...])
        if k[0] == "layers" and k[-1] == "weight" and k[-2] in LINEARS:
            assert float(group_zero_fraction(a, 4, "min")) == 0.5 == float(group_zero_fraction(a, 4, "mean"))
            if method != "sparsegpt":  # masking only; SparseGPT also updates the kept weights
                np.testing.assert_array_equal(a[a != 0], before[k][a != 0])
        else:
            np.testing.assert_array_equal(a, before[k])


def test_prune_progress_in_a_log_is_plain_lines_per_layer(monkeypatch, capsys):
    """Not a terminal (pytest captures stderr): ``qsparse_jax/progress.py``'s plain lines, no tqdm ``\\r`` bars;
    ``QSPARSE_PROGRESS_S=0`` makes every layer's line due at once."""
    monkeypatch.setenv("QSPARSE_PROGRESS_S", "0")
    prune_model(_tiny_model(), "magnitude", progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("prune magnitude 2:4: ")]
    assert lines[0].startswith("prune magnitude 2:4: 1/2 layers, ") and lines[0].endswith(" left"), err
    assert lines[-1].startswith("prune magnitude 2:4: 2/2 layers, done in "), err
    prune_model(_tiny_model(), "magnitude", progress=False)
    assert capsys.readouterr().err == ""
