"""Calibration on a model (each block linear's input norms and Hessians) and one-shot N:M pruning of every
block linear (magnitude, Wanda, SparseGPT)."""

import os
import sys

import numpy as np
import pytest

from qsparse_jax.ops.nm import group_zero_fraction
from qsparse_jax.transforms.calibration import METHODS, calibrate, prune_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "nn"))
from numpy_transformer import Reference  # noqa: E402 (the independent float64 forward of tests/nn)


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


class _RecordingReference(Reference):
    """The independent numpy forward, adding up ``Σ_tokens x_j²`` of every projection's input (what the
    projection's matmul consumes) per ``(layer, group, linear)``."""

    def __init__(self, config, params):
        super().__init__(config, params)
        self.names = {id(lin["weight"]): (i, group, name) for i, layer in self.p["layers"].items()
                      for group in ("attn", "mlp") for name, lin in layer[group].items() if name in LINEARS}
        self.sq: dict = {}

    def project(self, xs, w):
        x2 = xs.reshape(-1, xs.shape[-1])
        key = self.names[id(w)]
        self.sq[key] = self.sq.get(key, 0.0) + np.sum(x2 * x2, axis=0)
        return super().project(xs, w)


def _keep_2_of_4(score):
    """numpy: per output feature, the 2 highest scores of each 4 consecutive inputs ([in, out]), and per group
    the gap between the 2nd and 3rd highest over the highest (how clearly the group's choice is decided)."""
    g = np.moveaxis(score.reshape(score.shape[0] // 4, 4, score.shape[1]), 1, -1)  # [in/4, out, 4]
    order = np.argsort(-g, axis=-1, kind="stable")
    keep = np.zeros(g.shape, bool)
    np.put_along_axis(keep, order[..., :2], True, axis=-1)
    srt = np.take_along_axis(g, order, axis=-1)
    gap = (srt[..., 1] - srt[..., 2]) / np.maximum(srt[..., 0], 1e-300)
    return np.moveaxis(keep, -1, 1).reshape(score.shape), gap


def test_wanda_masks_are_the_score_masks_of_the_sequentially_calibrated_input_norms():
    """Wanda keeps, of each 4 inputs, the 2 largest ``|W_jo|·‖X_j‖`` (Sun et al. Eq. 1), ``X`` the inputs of the
    linear over the calibration tokens with the blocks before it already pruned. Recomputed here with the
    independent numpy forward (tests/nn/numpy_transformer.py) and a numpy top-2: a magnitude-only mask, dense
    calibration, or norms of the wrong tensor would not match."""
    import jax
    from flax import nnx

    model = _tiny_model()
    cfg = model.config
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    tokens = [np.random.default_rng(s).integers(0, 64, (2, 16)) for s in range(2)]
    pruned, _ = prune_model(model, "wanda", tokens)
    got = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(pruned)))
    decided = differs_from_magnitude = 0
    for i in range(cfg.n_layers):
        ref = _RecordingReference(cfg, params)  # layers < i already pruned by this test
        for t in tokens:
            ref.logits(t)
        for (layer, group, name), sq in ref.sq.items():
            if layer != i:
                continue
            w = params["layers"][i][group][name]["weight"]
            keep, gap = _keep_2_of_4(np.abs(w) * np.sqrt(sq)[:, None])
            clear = np.repeat(gap > 1e-4, 4, axis=0)  # float32 vs float64 norms: skip near-ties
            mask = got["layers"][i][group][name]["weight"] != 0
            np.testing.assert_array_equal(mask[clear], keep[clear], err_msg=f"layer {i} {group}/{name}")
            decided += int(clear.sum()) // 4
            differs_from_magnitude += int(np.any((keep != _keep_2_of_4(np.abs(w))[0]).reshape(-1, 4, w.shape[1]),
                                                 axis=1).sum())
            params["layers"][i][group][name]["weight"] = np.where(keep, w, 0).astype(w.dtype)
    n_groups = sum(w.size for w in jax.tree.leaves(got["layers"]) if w.ndim == 2) // 4
    assert decided > 0.99 * n_groups
    assert differs_from_magnitude > 0.1 * n_groups  # the check can tell Wanda from magnitude pruning


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
