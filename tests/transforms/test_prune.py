"""``qsparse prune``: one-shot 2:4 checkpoints that evaluate, train and export like any other."""

import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from qsparse_jax.config import Config, DataConfig, ModelConfig, TrainConfig, to_dict
from qsparse_jax.data.pipeline import load_splits, val_batches
from qsparse_jax.transforms.calibration import METHODS

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "nn"))
from numpy_transformer import Reference  # noqa: E402 (the independent float64 forward of tests/nn)

LINEARS = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}


def tiny_config(**model):
    m = dict(vocab_size=256, dim=32, n_layers=2, n_heads=2, hidden_dim=64, activation="relu2", max_seq_len=32)
    return Config(model=ModelConfig(**{**m, **model}), data=DataConfig(seq_len=16, batch_size=2),
                  train=TrainConfig(steps=2, log_every=1, eval_every=2, eval_batches=1))


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    """A random tiny ReLU² model saved as a training checkpoint (step 0), as import-hf writes one."""
    from qsparse_jax.checkpoints import native as ckpt
    from qsparse_jax.nn.model import Transformer

    cfg = tiny_config()
    d = tmp_path_factory.mktemp("dense") / "checkpoints"
    _, params = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(0)))
    mngr = ckpt.manager(d, cfg.checkpoint)
    ckpt.save(mngr, 0, {"params": params}, {}, to_dict(cfg), force=True)
    mngr.wait_until_finished()
    mngr.close()
    return d


def flat_params(path):
    from qsparse_jax.checkpoints.source import load

    return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(load(ckpt=str(path)).model))}


def pure_params(path):
    from qsparse_jax.checkpoints.source import load

    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(load(ckpt=str(path)).model)))


@pytest.mark.parametrize("method", METHODS)
def test_pruned_checkpoint_is_exactly_2_4_in_every_block_linear_and_loads_for_eval(method, dense_ckpt, tmp_path):
    from qsparse_jax.cli.eval import main as eval_main
    from qsparse_jax.transforms.prune import prune

    s = prune(method, str(tmp_path / "out"), ckpt=str(dense_ckpt), calib_batches=2, eval_batches=1, progress=False)
    # the reported losses are the dense input's and the written checkpoint's on the first validation batch,
    # recomputed with the independent numpy forward (tests/nn/numpy_transformer.py)
    cfg = tiny_config()
    t = np.asarray(next(iter(val_batches(load_splits(cfg.data).val, cfg.data, 1))))
    for key, path in (("val_loss_before", dense_ckpt), ("val_loss_after", tmp_path / "out" / "checkpoints")):
        logits = Reference(cfg.model, pure_params(path)).logits(t[:, :-1])
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, t[:, 1:, None], axis=-1).mean()
        assert s[key] == pytest.approx(nll, rel=1e-5), key
    assert abs(s["val_loss_after"] - s["val_loss_before"]) > 1e-4  # (so the check above tells the two apart)
    before, after = flat_params(dense_ckpt), flat_params(tmp_path / "out" / "checkpoints")
    assert before.keys() == after.keys()
    for k, a in after.items():
        if k[0] == "layers" and k[-1] == "weight" and k[-2] in LINEARS:
            groups = (a != 0).reshape(a.shape[0] // 4, 4, a.shape[1]).sum(1)
            assert np.all(groups == 2), k  # exactly 2 nonzeros in every group of 4 inputs
        else:  # embedding, LM head, norms: untouched
            np.testing.assert_array_equal(a, before[k])
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 4)
    assert eval_main(["--ckpt", str(tmp_path / "out" / "checkpoints"), "--ppl", str(text), "--batch_size", "2"]) == 0


def test_pruned_checkpoint_trains_with_ast_and_exports(dense_ckpt, tmp_path):
    from safetensors.numpy import load_file

    from qsparse_jax.checkpoints.hf import export_hf, hf_names
    from qsparse_jax.train.loop import train
    from qsparse_jax.transforms.prune import prune

    prune("wanda", str(tmp_path / "out"), ckpt=str(dense_ckpt), calib_batches=1, progress=False)
    cfg = tiny_config(weight_sparsity=dict(n=2, m=4, mask_every=1))
    metrics = train(cfg, tmp_path / "run", init_from=str(tmp_path / "out" / "checkpoints"))
    assert np.isfinite(metrics["val_loss"])
    dst = export_hf(str(tmp_path / "run" / "checkpoints"), str(tmp_path / "hf"))  # the trained run
    exported = load_file(dst / "model.safetensors")
    pruned, trained = flat_params(tmp_path / "out" / "checkpoints"), flat_params(tmp_path / "run" / "checkpoints")
    linears = {path: name for path, (name, _) in hf_names(cfg.model).items()
               if path[0] == "layers" and path[-2] in LINEARS and path[-1] == "weight"}
    assert len(linears) == 7 * cfg.model.n_layers
    for path, name in linears.items():
        t = exported[name]  # [out, in]: N:M groups run along the input axis, here the last (ops/nm.py)
        assert np.all((t != 0).reshape(t.shape[0], -1, 4).sum(-1) == 2), name  # 2 of every 4 inputs, no fewer
        # the trained weights with their AST mask applied (W ⊙ M), not the pruned input the run started from
        np.testing.assert_array_equal(t, np.where(trained[path[:-1] + ("mask",)] != 0, trained[path], 0).T, name)
        assert not np.array_equal(t, pruned[path].T), name


@pytest.mark.parametrize("args,msg", [
    (["--method", "magnitude", "--ckpt", "/no/such/ckpt", "--out", "O"], "error: --ckpt: no such directory '/no/such/ckpt'"),
    (["--method", "wanda", "--ckpt", "CKPT", "--out", "O", "--m", "3"], "error: --m 3 must divide every block linear's"),
    (["--method", "wanda", "--ckpt", "CKPT", "--out", "O", "--calib_batches", "0"], "error: --calib_batches must be >= 1"),
    (["--method", "wanda", "--ckpt", "CKPT", "--out", "O", "model.dim=8"], "error: only data.* overrides apply"),
])
def test_bad_input_is_a_one_line_error(args, msg, dense_ckpt, tmp_path, capsys):
    from qsparse_jax.cli.prune import main

    args = [str(tmp_path / "O") if a == "O" else str(dense_ckpt) if a == "CKPT" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(msg) and "\n" not in err, err
    assert not (tmp_path / "O").exists()


def test_prune_an_hf_directory(tmp_path):
    """--hf: a Llama directory (here a ReLU² one we export) is calibrated on the default corpus and written
    as a checkpoint + config.yaml whose model is the HF one."""
    import yaml

    from qsparse_jax.checkpoints.hf import save_pretrained
    from qsparse_jax.nn.model import Transformer
    from qsparse_jax.transforms.prune import prune

    save_pretrained(Transformer(tiny_config().model, rngs=nnx.Rngs(1)), tmp_path / "hf")
    s = prune("wanda", str(tmp_path / "out"), hf=str(tmp_path / "hf"), calib_batches=1, seq_len=16, progress=False)
    assert s["calib_tokens"] == 16 * 16  # one batch of data.batch_size 16 windows of 16 tokens
    cfg = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert cfg["model"]["activation"] == "relu2" and cfg["data"]["seq_len"] == 16
    w = flat_params(tmp_path / "out" / "checkpoints")[("layers", 0, "mlp", "w_up", "weight")]
    assert np.all((w != 0).reshape(-1, 4, w.shape[1]).sum(1) == 2)
