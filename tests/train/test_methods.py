"""The trainer's method interface (methods.py) and the methods on it: AST masks in training, distillation."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsparse_jax.config import ModelConfig, load_config
from qsparse_jax.nn.layers import SparseLinear, WeightMask
from qsparse_jax.train.methods.ast import AdaptiveSparseTraining
from qsparse_jax.train.methods.base import TrainingMethod, leaves_by_path
from qsparse_jax.train.methods.distill import kd_loss_sum
from qsparse_jax.train.step import make_train_step, setup
from qsparse_jax.train.loop import train
from qsparse_jax.ops.nm import nm_mask, slorb_init
from qsparse_jax.testing.fixtures import cpu_env

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.hidden_dim=64", "model.max_seq_len=32",
         "data.seq_len=32", "data.batch_size=8", "train.steps=6", "train.log_every=3", "train.eval_every=6",
         "train.eval_batches=1", "checkpoint.every=0", "checkpoint.async_save=false", "optim.warmup_steps=1",
         "model.sparsity.qkv=0", "model.sparsity.out=0", "model.sparsity.gate_up=0", "model.sparsity.down=0"]
AST = ["model.weight_sparsity.n=2", "model.weight_sparsity.m=4"]


def cfg_of(corpus, *extra):
    return load_config(str(ROOT / "configs/tiny.yaml"), SMALL + [f"data.source={corpus}", *extra])


def batch_of(cfg, seed=0):
    return jax.random.randint(jax.random.key(seed), (cfg.data.batch_size, cfg.data.seq_len + 1), 0, 256)


def masks(params):
    return {p: np.asarray(v) for p, v in leaves_by_path(nnx.split_state(params, WeightMask, ...)[0]).items()}


# --- AST in the layer ------------------------------------------------------------------------------

def ast_linear(**ws):
    cfg = ModelConfig(weight_sparsity={"n": 2, "m": 4, **ws})
    return SparseLinear(16, 8, keep=None, cfg=cfg, axes=("embed", "mlp"), rngs=nnx.Rngs(0))


def test_ast_forward_uses_the_masked_weight():
    lin = ast_linear()
    x = jax.random.normal(jax.random.key(1), (3, 16))
    w, m = np.asarray(lin.weight[...]), np.asarray(lin.mask[...])
    np.testing.assert_array_equal(m, np.asarray(nm_mask(jnp.abs(w), 2, 4)))
    np.testing.assert_allclose(np.asarray(lin(x)), np.asarray(x) @ (w * m), rtol=1e-5, atol=1e-6)


def test_ast_gradient_is_straight_through_dense():
    """d/dW of ``g · (x @ (W ⊙ M))`` is ``xᵀ g`` for every weight, pruned ones included (SEEDS §2)."""
    lin = ast_linear()
    x = jax.random.normal(jax.random.key(1), (3, 16))
    g = jax.random.normal(jax.random.key(2), (3, 8))
    graphdef, params, rest = nnx.split(lin, nnx.Param, ...)
    grad = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x) * g))(params)
    np.testing.assert_allclose(np.asarray(grad["weight"][...]), np.asarray(x).T @ np.asarray(g), rtol=1e-5, atol=1e-6)


def test_ast_with_quantized_weights_is_the_quantizer_of_the_masked_weight():
    """Effective weight = Q_w(W ⊙ M) with M the 2:4 magnitude mask, rebuilt here in numpy: the ternary
    levels exactly (absmean scale of W ⊙ M, Eq. 9-10) and 1-bit sign(W ⊙ M − mean)·mean|W ⊙ M| inside M."""
    for bits in ("1.58", "1"):
        cfg = ModelConfig(weight_sparsity={"n": 2, "m": 4}, weight_bits=bits)
        lin = SparseLinear(16, 8, keep=None, cfg=cfg, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
        w = np.asarray(lin.weight[...], np.float64)
        a = np.abs(w).reshape(4, 4, 8)
        rank = (a[:, None, :, :] > a[:, :, None, :]).sum(2) + (
            (a[:, None, :, :] == a[:, :, None, :]) & (np.arange(4)[None, :] < np.arange(4)[:, None])[None, :, :, None]
        ).sum(2)
        mask = (rank < 2).reshape(16, 8)
        np.testing.assert_array_equal(np.asarray(lin.mask[...]), mask)
        wm = w * mask
        got = np.asarray(lin.effective_weight(), np.float64)
        assert np.all((got.reshape(4, 4, 8) != 0).sum(1) <= 2) and np.all(got[~mask] == 0)
        if bits == "1.58":
            sc = 1.0 / max(np.abs(wm).mean(), 1e-5)
            levels = np.clip(np.round(wm * sc), -1, 1)
            np.testing.assert_array_equal(np.round(got * sc), levels)
            np.testing.assert_allclose(got, levels / sc, rtol=1e-6)
        else:
            want = np.where(mask, np.sign(wm - wm.mean()) * np.abs(wm).mean(), 0.0)
            np.testing.assert_allclose(got, want, rtol=1e-6)


def test_slorb_adds_s_times_group_sums_initialized_to_pruned_group_means():
    lin = ast_linear(slorb=True, slorb_group=4)
    w, m = lin.weight[...], lin.mask[...]
    np.testing.assert_allclose(np.asarray(lin.slorb_s[...]), np.asarray(slorb_init(w, m, 4)), rtol=1e-6)
    x = jax.random.normal(jax.random.key(1), (3, 16))
    sums = np.asarray(x).reshape(3, 4, 4).sum(-1)  # X x: each group of 4 inputs summed
    want = np.asarray(x) @ np.asarray(w * m) + sums @ np.asarray(lin.slorb_s[...])
    np.testing.assert_allclose(np.asarray(lin(x)), want, rtol=1e-5, atol=1e-5)


# --- AST in the trainer ----------------------------------------------------------------------------

def test_masks_change_only_at_refresh_steps(corpus):
    cfg = cfg_of(corpus, *AST, "model.weight_sparsity.mask_every=3", "optim.lr=0.05", "optim.warmup_steps=0")
    s, state = setup(cfg)
    step = make_train_step(s)
    seen = [masks(state["params"])]
    for i in range(6):
        state, m = step(state, batch_of(cfg, i))
        seen.append(masks(state["params"]))
    changed = [any(np.any(a[p] != b[p]) for p in a) for a, b in zip(seen, seen[1:])]
    assert changed == [False, False, True, False, False, True]  # after steps 3 and 6 only
    for ms in seen:
        for v in ms.values():  # always exactly 2 of every 4 inputs
            assert np.all(v.reshape(v.shape[0] // 4, 4, -1).sum(1) == 2)
    assert float(np.mean(m["ast/flip_since_refresh"])) > 0


def test_a_mask_flips_when_a_pruned_weight_outgrows_a_kept_one():
    cfg = load_config(str(ROOT / "configs/tiny.yaml"), SMALL + AST + ["model.n_layers=2"])  # layer 1: no flip
    method = AdaptiveSparseTraining(cfg)
    s, state = setup(cfg)
    params = state["params"]
    path = ("layers", 0, "mlp", "w_up")
    w = np.array(params["layers"][0]["mlp"]["w_up"]["weight"][...])
    w[0:4, 0] = [1.0, 0.9, 0.1, 0.2]  # kept: inputs 0 and 1
    params["layers"][0]["mlp"]["w_up"]["weight"][...] = jnp.asarray(w)
    params = method.prepare(params)
    assert masks(params)[path + ("mask",)][0:4, 0].tolist() == [True, True, False, False]
    w[0:4, 0] = [1.0, 0.1, 0.1, 0.95]  # input 3 crosses input 1
    params["layers"][0]["mlp"]["w_up"]["weight"][...] = jnp.asarray(w)
    mstate = method.init_state(params)
    every = cfg.model.weight_sparsity.mask_every
    kept, _ = method.refresh(params, mstate, jnp.asarray(every - 2))  # not a refresh step: unchanged
    assert masks(kept)[path + ("mask",)][0:4, 0].tolist() == [True, True, False, False]
    flipped, ms = method.refresh(params, mstate, jnp.asarray(every - 1))
    assert masks(flipped)[path + ("mask",)][0:4, 0].tolist() == [True, False, False, True]
    assert float(ms["flip_refresh"][0]) > 0 and float(ms["flip_refresh"][1]) == 0


def test_decay_is_added_to_pruned_weights_gradients_only(corpus):
    cfg = cfg_of(corpus, *AST, "model.weight_sparsity.decay_rate=1e-3", "model.weight_sparsity.decay_max=1.0")
    method = AdaptiveSparseTraining(cfg)
    s, state = setup(cfg)
    params = state["params"]
    train_params = nnx.split_state(params, nnx.Param, ...)[0]
    zeros = jax.tree.map(jnp.zeros_like, train_params)
    out = leaves_by_path(method.adjust_clipped(zeros, params, jnp.asarray(100)))  # the default: after clipping
    flat = leaves_by_path(params)
    for p, g in out.items():
        if p[-1] == "weight" and p[:-1] + ("mask",) in flat:
            mask, w = np.asarray(flat[p[:-1] + ("mask",)]), np.asarray(flat[p])
            np.testing.assert_allclose(np.asarray(g), np.where(mask, 0.0, 0.1 * w), rtol=1e-6)  # λ(100) = 0.1
        else:
            assert not np.any(np.asarray(g))  # norms, embeddings, head: untouched


# --- the generic interface: frozen parameters ------------------------------------------------------

class FreezeEmbedding(TrainingMethod):
    name = "freeze"

    def frozen(self, trainable):
        return jax.tree_util.tree_map_with_path(lambda p, _: "embed" in jax.tree_util.keystr(p), trainable)


def test_frozen_parameters_stay_bit_identical(corpus):
    cfg = cfg_of(corpus, "optim.warmup_steps=0")
    s, state = setup(cfg)
    s.methods = [FreezeEmbedding()]
    before = {k: np.asarray(v) for k, v in leaves_by_path(state["params"]).items()}
    state, _ = make_train_step(s)(state, batch_of(cfg))
    after = leaves_by_path(state["params"])
    np.testing.assert_array_equal(np.asarray(after[("embed",)]), before[("embed",)])
    assert not np.array_equal(np.asarray(after[("layers", 0, "mlp", "w_up", "weight")]),
                              before[("layers", 0, "mlp", "w_up", "weight")])


# --- distillation ------------------------------------------------------------------------------------

def test_kd_loss_is_zero_for_the_teacher_itself_and_matches_numpy():
    s = jax.random.normal(jax.random.key(0), (2, 3, 11))
    t = jax.random.normal(jax.random.key(1), (2, 3, 11))
    assert abs(float(kd_loss_sum(s, s, 2.0))) < 1e-6
    T = 2.0
    def log_softmax(z):
        z = np.asarray(z, np.float64) / T
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    pt, ps = log_softmax(t), log_softmax(s)
    want = (np.exp(pt) * (pt - ps)).sum(-1) * T * T
    w = np.array([[1.0, 0.0, 1.0], [0.5, 1.0, 0.0]])
    np.testing.assert_allclose(float(kd_loss_sum(s, t, T)), want.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(kd_loss_sum(s, t, T, jnp.asarray(w))), (want * w).sum(), rtol=1e-5)


def test_ast_with_distillation_from_a_dense_checkpoint(corpus, tmp_path):
    """Dense run → AST 2:4 + KD + SLoRB from it (--init_from, teacher = the same checkpoint): masks and S
    made from the loaded weights, loss parts reported, N:M kept, and the first loss below a fresh 2:4 start."""
    train(cfg_of(corpus), tmp_path / "dense")
    teacher = str(tmp_path / "dense" / "checkpoints")
    extra = [*AST, "model.weight_sparsity.slorb=true", "model.weight_sparsity.slorb_group=8",
             f"train.distill.teacher={teacher}", "train.steps=3", "train.log_every=1"]
    m = train(cfg_of(corpus, *extra), tmp_path / "ast", init_from=teacher)
    rows = [json.loads(r) for r in open(tmp_path / "ast" / "metrics.jsonl")]
    assert {"ce", "kd", "ast/flip_since_start", "ast/zero_fraction"} <= set(rows[0])
    assert rows[0]["kd"] > 0 and m["ast/groups_not_nm"] == 0 and m["ast/zero_fraction"] == pytest.approx(0.5)
    np.testing.assert_allclose(rows[0]["loss"], rows[0]["ce"] + rows[0]["kd"], rtol=1e-5)
    train(cfg_of(corpus, *extra[:-3], "train.steps=3", "train.log_every=1"), tmp_path / "fresh")
    fresh = [json.loads(r) for r in open(tmp_path / "fresh" / "metrics.jsonl")]
    assert rows[0]["ce"] < fresh[0]["ce"]
    from qsparse_jax.checkpoints.native import CheckpointError

    with pytest.raises(CheckpointError, match="lacks .* parameters of this model"):  # only a method's leaves may be absent
        train(cfg_of(corpus, *extra, "model.qkv_bias=true"), tmp_path / "bias", init_from=teacher)


def test_an_ast_run_resumes_exactly(corpus, tmp_path):
    """Masks, the flip reference and the refresh schedule are part of the checkpoint."""
    extra = [*AST, "model.weight_sparsity.mask_every=2", "optim.lr=0.03", "train.log_every=1"]
    train(cfg_of(corpus, *extra), tmp_path / "straight")
    train(cfg_of(corpus, *extra), tmp_path / "resumed", stop_after=3)
    train(cfg_of(corpus, *extra), tmp_path / "resumed")
    rows = lambda d: [json.loads(r) for r in open(d / "metrics.jsonl")]
    want, got = rows(tmp_path / "straight"), rows(tmp_path / "resumed")
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert [r["ast/flip_since_start"] for r in got] == [r["ast/flip_since_start"] for r in want]


def test_a_missing_teacher_is_a_one_line_error(corpus, tmp_path):
    from qsparse_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="train.distill.teacher: no such"):
        train(cfg_of(corpus, "train.distill.teacher=/nonexistent"), tmp_path / "x")


MESH_SCRIPT = """
import json, sys
from qsparse_jax.config import load_config
from qsparse_jax.train.loop import train
train(load_config(sys.argv[1], json.loads(sys.argv[2])), sys.argv[3])
"""


def test_ast_under_an_fsdp_tensor_mesh_gives_the_single_device_losses(corpus, tmp_path):
    import os
    import subprocess
    import sys

    extra = [*AST, "model.weight_sparsity.slorb=true", "model.weight_sparsity.slorb_group=8",
             "model.weight_sparsity.mask_every=2", "train.steps=4", "train.log_every=1"]
    train(cfg_of(corpus, *extra), tmp_path / "one")
    env = cpu_env(8)
    overrides = SMALL + [f"data.source={corpus}", *extra, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    out = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(ROOT / "configs/tiny.yaml"), json.dumps(overrides),
                          str(tmp_path / "eight")], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = lambda d: [json.loads(r) for r in open(d / "metrics.jsonl")]
    one, eight = rows(tmp_path / "one"), rows(tmp_path / "eight")
    np.testing.assert_allclose([r["loss"] for r in eight], [r["loss"] for r in one], atol=1e-5)
    assert [r["ast/flip_since_start"]["overall"] for r in eight] == pytest.approx(
        [r["ast/flip_since_start"]["overall"] for r in one], abs=1e-6)


def test_parameter_accounting_counts_kept_weights_and_slorb():
    from qsparse_jax.nn.model import Transformer, activated_params, projection_params

    cfg = ModelConfig(weight_sparsity={"n": 2, "m": 4, "slorb": True, "slorb_group": 16})
    dense = {g: 0.0 for g in ("qkv", "out", "up", "gate", "down")}
    acct = activated_params(cfg, dense)
    lin = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))[1]
    n_slorb = sum(v.size for p, v in leaves_by_path(lin).items() if p[-1] == "slorb_s")
    assert acct["N_slorb"] == n_slorb == sum(projection_params(cfg).values()) / 16
    assert acct["N_a"] == sum(projection_params(cfg).values()) / 2 + n_slorb


@pytest.mark.parametrize("base, remat", [([], "full"), (["model.scan_layers=true"], "dots")], ids=["remat", "scan-remat"])
def test_ast_step_under_remat_equals_the_plain_step(corpus, base, remat):
    losses = []
    for extra in (base, [*base, f"model.remat={remat}"]):
        cfg = cfg_of(corpus, *AST, "model.weight_sparsity.slorb=true", "model.weight_sparsity.slorb_group=8", *extra)
        s, state = setup(cfg)
        state, m = make_train_step(s)(state, batch_of(cfg))
        losses.append(float(m["loss"]))
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)


def test_q_sparse_training_distills_from_an_hf_teacher(corpus, tmp_path):
    """Distillation is not tied to AST: a Q-Sparse student (keep 70 %) with a dense HF-format teacher."""
    from qsparse_jax.checkpoints.hf import save_pretrained
    from qsparse_jax.nn.model import Transformer

    cfg = cfg_of(corpus, "model.activation=silu")
    teacher = Transformer(cfg.model, rngs=nnx.Rngs(7))  # not the student's init: a KL far from 0
    save_pretrained(teacher, tmp_path / "teacher")
    student = [f"model.sparsity.{g}=0.3" for g in ("qkv", "out", "gate_up", "down")]
    distill = [f"train.distill.teacher={tmp_path / 'teacher'}", "train.distill.weight=1.0"]
    # the step's kd is the KL from the teacher's own logits (the model saved above, not the reloaded one);
    # the training loop's side of distillation (kd in metrics.jsonl) is checked by the AST test above
    scfg = cfg_of(corpus, "model.activation=silu", *student, *distill)
    s, state = setup(scfg)
    batch = batch_of(scfg)
    inputs = batch[:, :-1]
    student_logits = s.apply(state["params"], inputs)
    consts = {m.name: c for m in s.methods if (c := m.constants(s.mesh)) is not None}  # the teacher, as train does
    _, m1 = make_train_step(s, consts)(state, batch)
    want = kd_loss_sum(student_logits, teacher(inputs), scfg.train.distill.temperature) / inputs.size
    assert float(m1["kd"]) == pytest.approx(float(want), rel=1e-4) and float(want) > 1e-3
    assert float(m1["loss"]) == pytest.approx(float(m1["ce"] + m1["kd"]), rel=1e-5)


def test_ast_with_top_k_activations_and_ternary_weights_trains_and_runs_through_the_kernels(corpus):
    """AST composes with Q-Sparse top-K and 1.58-bit weights; the packed-kernel path sees W ⊙ M too."""
    from qsparse_jax.nn.model import with_config

    quant = ["model.weight_bits=1.58", "model.act_bits=8", "model.input_norm=true"]
    topk = [f"model.sparsity.{g}=0.5" for g in ("qkv", "out", "gate_up", "down")]
    cfg = cfg_of(corpus, *AST, *quant, *topk, "optim.warmup_steps=0")
    s, state = setup(cfg)
    state, m = make_train_step(s)(state, batch_of(cfg))
    assert np.isfinite(float(m["loss"]))
    model = nnx.merge(s.graphdef, state["params"])
    tokens = batch_of(cfg)[:2, :16]
    want = model(tokens)
    got = with_config(model, kernels="xla")(tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-3, atol=2e-3)
