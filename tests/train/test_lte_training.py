"""Training LTE (train/methods/lte.py): stage 2 freezes the routers, stage 1 trains them; the efficiency loss raises
FFN sparsity with eta; the logged sparsity, FLOPs and histogram; remat and a data/fsdp/tensor mesh keep the losses;
``--init_from`` a dense checkpoint under an LTE config is a one-line error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsparse_jax.analysis.lte_probes import layer_sparsity
from qsparse_jax.checkpoints.native import CheckpointError
from qsparse_jax.config import load_config
from qsparse_jax.nn.lte import ffn_flops_per_token, lte_summary
from qsparse_jax.nn.model import Transformer
from qsparse_jax.train.loop import train
from qsparse_jax.train.methods import methods_for
from qsparse_jax.train.methods.base import leaves_by_path
from qsparse_jax.train.step import make_stats_step, make_train_step, setup
from qsparse_jax.testing.fixtures import cpu_env
from qsparse_jax.transforms.lte_convert import write_checkpoint

ROOT = Path(__file__).resolve().parents[2]

SMALL = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.hidden_dim=128", "model.max_seq_len=64",
         "data.seq_len=32", "data.batch_size=8", "checkpoint.every=0", "checkpoint.async_save=false",
         "optim.warmup_steps=0", "model.sparsity.qkv=0", "model.sparsity.out=0", "model.sparsity.gate_up=0",
         "model.sparsity.down=0", "model.lte.enabled=true", "model.lte.expert_size=16"]



def _setup(*extra):
    cfg = load_config(str(ROOT / "configs/tiny.yaml"), SMALL + list(extra))
    s, state = setup(cfg)
    return s, state, make_train_step(s)


def _batch(seed=0):
    # a learnable stream: repeated short phrases
    rng = np.random.default_rng(seed)
    phrases = rng.integers(0, 256, (6, 11))
    rows = [np.concatenate([phrases[i] for i in rng.integers(0, 6, 4)])[:33] for _ in range(8)]
    return jnp.asarray(np.stack(rows), jnp.int32)


def _routers(state):
    return {p: np.asarray(v) for p, v in leaves_by_path(state["params"]).items() if "router" in p}


def test_router_parameters_are_bit_identical_after_a_stage2_step():
    s, state, step = _setup("model.lte.stage=2", "optim.lr=1e-2")
    before, w_before = _routers(state), np.asarray(state["params"]["layers"][0]["mlp"]["w_up"]["weight"][...])
    state, m = step(state, _batch())
    after = _routers(state)
    assert before.keys() == after.keys() and len(before) == 2
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert not np.array_equal(w_before, np.asarray(state["params"]["layers"][0]["mlp"]["w_up"]["weight"][...]))
    # in stage 1 the routers train
    s, state, step = _setup("model.lte.stage=1", "model.lte.eta=1.0", "optim.lr=1e-2")
    before = _routers(state)
    state, m = step(state, _batch())
    assert any(not np.array_equal(before[k], v) for k, v in _routers(state).items())
    assert float(m["lte_efficiency"]) > 0


def test_efficiency_loss_raises_ffn_sparsity_monotonically_with_eta(capsys):
    sparsity = {}
    for eta in (0.0, 0.3, 1.0):
        s, state, step = _setup(f"model.lte.eta={eta}", "model.lte.separability=0.1", "optim.lr=1e-2",
                                "train.steps=25")
        for i in range(25):
            state, m = step(state, _batch(i))
        stats = make_stats_step(s)(state["params"], _batch(99))
        sparsity[eta] = lte_summary(s.cfg.model, stats)[0]["ffn_sparsity"]
    with capsys.disabled():
        print(f"\nLTE FFN sparsity after 25 stage-1 steps by eta: {json.dumps(sparsity)}")
    a, b, c = sparsity.values()
    assert a < b < c, sparsity
    assert c > 0.5


def test_log_metrics_report_sparsity_flops_and_histogram():
    s, state, _ = _setup("model.lte.stage=2")
    stats = make_stats_step(s)(state["params"], _batch())
    (method,) = methods_for(s.cfg)
    out = method.log_metrics(state["params"], stats, 8 * 32)
    lte = out["lte"]
    assert 0 <= lte["ffn_sparsity"] <= 1
    assert lte["ffn_flops_per_token"] == pytest.approx(ffn_flops_per_token(s.cfg.model, lte["active_experts"]))
    assert lte["dense_ffn_flops_per_token"] == 6 * 32 * 128 * 2
    assert sum(out["lte_hist"].values()) == pytest.approx(1.0)
    # per-layer numbers from walking the layers
    model = nnx.merge(s.graphdef, state["params"])
    per_layer = layer_sparsity(model, _batch()[:, :-1])
    assert np.mean(per_layer) == pytest.approx(lte["ffn_sparsity"], abs=1e-6)
    assert [lte[f"ffn_sparsity_layer{i}"] for i in range(len(per_layer))] == pytest.approx(per_layer, abs=1e-6)


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scan"])
def test_stage1_keeps_remat_and_its_loss_terms(scan):
    """The model returns its statistics through the remat'd blocks: same loss and terms as without remat."""
    out = []
    for remat in ("none", "full"):
        s, state, step = _setup("model.lte.eta=0.3", f"model.remat={remat}", f"model.scan_layers={str(scan).lower()}")
        _, m = step(state, _batch())
        out.append({k: float(m[k]) for k in ("loss", "lte_efficiency", "lte_separability")})
    assert out[1] == pytest.approx(out[0], abs=1e-5)


MESH_SCRIPT = """
import json, sys
from qsparse_jax.config import load_config
from qsparse_jax.train.loop import train
train(load_config(sys.argv[1], json.loads(sys.argv[2])), sys.argv[3])
"""


def test_stage1_under_a_data_fsdp_tensor_mesh_gives_the_single_device_losses(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "c").mkdir()
    for i in range(8):
        (tmp_path / "c" / f"d{i}.py").write_text(" ".join(rng.choice(["def", "return", "self", "x", "(", ")"], 400)))
    over = SMALL + [f"data.source={tmp_path / 'c'}", "model.lte.eta=0.5", "train.steps=3", "train.log_every=1",
                    "train.eval_every=3", "train.eval_batches=1"]
    train(load_config(str(ROOT / "configs/tiny.yaml"), over), tmp_path / "one")
    env = cpu_env(8)
    out = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(ROOT / "configs/tiny.yaml"),
                          json.dumps(over + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]), str(tmp_path / "eight")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = lambda d: [json.loads(r) for r in open(d / "metrics.jsonl")]
    one, eight = rows(tmp_path / "one"), rows(tmp_path / "eight")
    np.testing.assert_allclose([r["loss"] for r in eight], [r["loss"] for r in one], atol=1e-5)
    np.testing.assert_allclose([r["lte_efficiency"] for r in eight], [r["lte_efficiency"] for r in one], atol=1e-6)
    assert [r["lte"]["ffn_sparsity"] for r in eight] == pytest.approx([r["lte"]["ffn_sparsity"] for r in one], abs=1e-6)


def test_init_from_a_dense_checkpoint_under_an_lte_config_is_a_one_line_error(tmp_path):
    (tmp_path / "c").mkdir()
    for i in range(8):
        (tmp_path / "c" / f"d{i}.py").write_text(f"def f{i}(x):\n    return x\n" * 100)
    base = SMALL[:-2] + [f"data.source={tmp_path / 'c'}", "train.steps=1"]
    dense_cfg = load_config(str(ROOT / "configs/tiny.yaml"), base)
    write_checkpoint(Transformer(dense_cfg.model, rngs=nnx.Rngs(0)), dense_cfg, tmp_path / "dense")
    cfg = load_config(str(ROOT / "configs/tiny.yaml"), base + ["model.lte.enabled=true", "model.lte.expert_size=16"])
    with pytest.raises(CheckpointError, match="lacks 2 parameters .*router.*qsparse lte convert"):
        train(cfg, tmp_path / "run", init_from=str(tmp_path / "dense" / "checkpoints"))
