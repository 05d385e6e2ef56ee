"""AST as the authors run it (thu-ml/Adaptive-Sparse-Trainer): the full trainable SLoRB X, S from the dense
original at a one-shot-pruned start, the decay after clipping, Wanda-scored masks, SquareHead distillation."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsparse_jax.checkpoints.native import write_model_checkpoint
from qsparse_jax.config import ModelConfig, load_config
from qsparse_jax.errors import ConfigError
from qsparse_jax.nn.layers import SparseLinear
from qsparse_jax.nn.model import Transformer, activated_params
from qsparse_jax.ops.nm import nm_mask, slorb_init
from qsparse_jax.train.methods.ast import AdaptiveSparseTraining, save_act_norms
from qsparse_jax.train.methods.base import leaves_by_path
from qsparse_jax.train.methods.distill import SQUAREHEAD_EPS, squarehead_loss_sum
from qsparse_jax.train.step import make_train_step, setup, trainable

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.hidden_dim=64", "model.max_seq_len=32",
         "data.seq_len=32", "data.batch_size=8", "train.steps=6", "checkpoint.every=0", "checkpoint.async_save=false",
         "model.sparsity.qkv=0", "model.sparsity.out=0", "model.sparsity.gate_up=0", "model.sparsity.down=0"]
AST = ["model.weight_sparsity.n=2", "model.weight_sparsity.m=4"]
SLORB = [*AST, "model.weight_sparsity.slorb=true", "model.weight_sparsity.slorb_group=8"]


def cfg_of(*extra):
    return load_config(str(ROOT / "configs/tiny.yaml"), [*SMALL, *extra])


def batch_of(cfg, seed=0):
    return jax.random.randint(jax.random.key(seed), (cfg.data.batch_size, cfg.data.seq_len + 1), 0, 256)


# --- SLoRB's trainable X: the full [in/k, in] projection ----------------------------------------------------

def test_trainable_x_is_the_full_projection_initialized_to_the_group_sums():
    cfg = ModelConfig(weight_sparsity={"n": 2, "m": 4, "slorb": True, "slorb_group": 4, "slorb_train_x": True})
    lin = SparseLinear(16, 8, keep=None, cfg=cfg, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    X = np.asarray(lin.slorb_x[...])
    assert X.shape == (4, 16)
    np.testing.assert_array_equal(X, np.kron(np.eye(4), np.ones((1, 4))))  # block-diagonal ones
    x = jax.random.normal(jax.random.key(1), (3, 16))
    w, m, S = (np.asarray(v) for v in (lin.weight[...], lin.mask[...], lin.slorb_s[...]))
    np.testing.assert_allclose(np.asarray(lin(x)), np.asarray(x) @ (w * m) + np.asarray(x) @ X.T @ S, rtol=1e-5, atol=1e-5)


def test_off_block_entries_of_x_learn_in_training():
    """After one AdamW step every X has moved off its block diagonal (Adam moves exactly the entries whose
    gradient is non-zero, and there is no weight decay on X)."""
    cfg = cfg_of(*SLORB, "model.weight_sparsity.slorb_train_x=true", "optim.warmup_steps=0", "optim.lr=0.01")
    s, state = setup(cfg)
    before = {p: np.asarray(v) for p, v in leaves_by_path(state["params"]).items() if p[-1] == "slorb_x"}
    assert len(before) == 14  # q, k, v, o, gate, up, down in 2 layers
    state, _ = make_train_step(s)(state, batch_of(cfg))
    after = leaves_by_path(state["params"])
    for p, x0 in before.items():
        off_block = np.kron(np.eye(x0.shape[0]), np.ones((1, 8))) == 0
        moved = np.asarray(after[p])[off_block] != x0[off_block]
        assert moved.mean() > 0.5, p


def _ce(s, train_params, params, batch):
    from qsparse_jax.nn.model import nll_sum

    full = nnx.merge_state(train_params, nnx.split_state(params, nnx.Param, ...)[1])
    total, n = nll_sum(s.apply(full, batch[:, :-1]), batch[:, 1:])
    return total / n


def test_parameter_count_includes_the_full_x():
    cfg = ModelConfig(weight_sparsity={"n": 2, "m": 4, "slorb": True, "slorb_group": 16, "slorb_train_x": True})
    leaves = leaves_by_path(nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))[1])
    n = sum(v.size for p, v in leaves.items() if p[-1] in ("slorb_s", "slorb_x"))
    acct = activated_params(cfg, {g: 0.0 for g in ("qkv", "out", "up", "gate", "down")})
    assert acct["N_slorb"] == n
    assert sum(v.size for p, v in leaves.items() if p[-1] == "slorb_x") == sum(
        v.shape[-2] ** 2 // 16 for p, v in leaves.items() if p[-1] == "weight" and p[:-1] + ("mask",) in leaves)


# --- SLoRB S at a one-shot-pruned start -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dense_and_pruned(tmp_path_factory):
    """A dense checkpoint and its 2:4 magnitude-pruned weights (as `qsparse prune` writes them)."""
    d = tmp_path_factory.mktemp("dense")
    cfg = cfg_of()
    model = Transformer(cfg.model, rngs=nnx.Rngs(3))
    write_model_checkpoint(model, cfg, d)
    dense = leaves_by_path(nnx.state(model))
    pruned = {p: (np.where(np.asarray(nm_mask(jnp.abs(w))), w, 0) if p[0] == "layers" and w.ndim == 2 else np.asarray(w))
              for p, w in dense.items()}
    return str(d / "checkpoints"), dense, pruned


def _load_into(params, values):
    return jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.asarray(values[k], v.dtype) if (k := _key(path)) in values else v, params)


def _key(path):
    from qsparse_jax.train.methods.base import key_path

    return key_path(path)


def test_slorb_from_a_pruned_start_reads_the_dense_original(dense_and_pruned):
    src, dense, pruned = dense_and_pruned
    s, state = setup(cfg_of(*SLORB, f"model.weight_sparsity.source={src}"))
    params = _load_into(state["params"], {p: v for p, v in pruned.items() if p[-1] == "weight"})
    started = leaves_by_path(s.start(params)["params"])
    for p, S in started.items():
        if p[-1] == "slorb_s":
            w_dense = np.asarray(dense[p[:-1] + ("weight",)])
            mask = np.asarray(started[p[:-1] + ("mask",)])
            np.testing.assert_array_equal(mask, np.asarray(pruned[p[:-1] + ("weight",)]) != 0)  # the pruned zeros
            assert np.any(np.asarray(S) != 0)
            np.testing.assert_allclose(np.asarray(S), np.asarray(slorb_init(w_dense, mask, 8)), rtol=1e-6, atol=1e-8)


def test_slorb_from_a_pruned_start_without_a_dense_original_is_a_one_line_error(dense_and_pruned):
    _, _, pruned = dense_and_pruned
    s, state = setup(cfg_of(*SLORB))
    params = _load_into(state["params"], {p: v for p, v in pruned.items() if p[-1] == "weight"})
    with pytest.raises(ConfigError, match=r"one-shot-pruned start .* needs the dense original: set "
                                          r"model.weight_sparsity.source or train.distill.teacher") as e:
        s.start(params)
    assert "\n" not in str(e.value)


# --- the decay after clipping ------------------------------------------------------------------------------------

def test_decay_is_added_after_clipping_as_the_authors_do():
    """One AdamW step at step 3 with strong clipping: the update of every pruned weight is
    ``−lr · g'/(|g'| + ε)`` with ``g' = clip(g) + λ(3)·W`` (Adam's first step), not the update of decaying
    before clipping, ``g' = clip(g + λ(3)·W)``, which differs here."""
    lr, rate, clip = 0.01, 2e-3, 1e-3
    cfg = cfg_of(*AST, "optim.schedule=constant", "optim.warmup_steps=0", f"optim.lr={lr}", "optim.weight_decay=0",
                 f"optim.clip_norm={clip}", f"model.weight_sparsity.decay_rate={rate}", "model.weight_sparsity.decay_max=1")
    s, state = setup(cfg)
    state["step"] = jnp.asarray(3, jnp.int32)
    params = state["params"]
    g = {p: np.asarray(v, np.float64) for p, v in
         leaves_by_path(jax.grad(lambda tp: _ce(s, tp, params, batch_of(cfg)))(trainable(params)[0])).items()}
    flat = {p: np.asarray(v, np.float64) for p, v in leaves_by_path(params).items()}
    new = leaves_by_path(make_train_step(s)(state, batch_of(cfg))[0]["params"])
    lam = 3 * rate
    decay = {p: lam * np.where(flat[p[:-1] + ("mask",)], 0, w) if p[:-1] + ("mask",) in flat else 0 * g[p]
             for p, w in flat.items() if p in g}
    norm = lambda t: np.sqrt(sum(np.sum(v ** 2) for v in t.values()))
    after = {p: min(1.0, clip / norm(g)) * g[p] + decay[p] for p in g}
    before = {p: min(1.0, clip / norm({q: g[q] + decay[q] for q in g})) * (g[p] + decay[p]) for p in g}
    differ = 0
    for p, w in flat.items():
        if p[-1] == "weight" and p[:-1] + ("mask",) in flat:
            pruned = flat[p[:-1] + ("mask",)] == 0
            adam = lambda gp: w - lr * gp / (np.abs(gp) + 1e-8)
            np.testing.assert_allclose(np.asarray(new[p])[pruned], adam(after[p])[pruned], rtol=1e-5, atol=1e-7)
            differ += np.sum(np.abs(adam(after[p]) - adam(before[p]))[pruned] > 1e-4)
    assert differ > 100  # the two orders really differ here


def test_decay_before_clipping_is_the_option():
    cfg = cfg_of(*AST, "model.weight_sparsity.decay_rate=1e-3", "model.weight_sparsity.decay_max=1")
    params = setup(cfg)[1]["params"]
    zeros = jax.tree.map(jnp.zeros_like, trainable(params)[0])
    for after in (True, False):
        method = AdaptiveSparseTraining(cfg_of(*AST, "model.weight_sparsity.decay_rate=1e-3",
                                               "model.weight_sparsity.decay_max=1",
                                               f"model.weight_sparsity.decay_after_clip={str(after).lower()}"))
        pre, post = (leaves_by_path(f(zeros, params, jnp.asarray(100))) for f in (method.adjust_grads,
                                                                                   method.adjust_clipped))
        decayed, untouched = (post, pre) if after else (pre, post)
        w = ("layers", 0, "mlp", "w_up", "weight")
        assert np.any(np.asarray(decayed[w]) != 0) and not any(np.any(np.asarray(v)) for v in untouched.values())


# --- Wanda-scored masks ------------------------------------------------------------------------------------------

def test_wanda_scored_masks_keep_the_top_n_of_w_times_input_norm(tmp_path):
    from qsparse_jax.transforms.calibration import calibrate

    cfg = cfg_of(*AST)
    s, state = setup(cfg)
    model = nnx.merge(s.graphdef, state["params"])
    calib = calibrate(model, [np.asarray(batch_of(cfg, 5)[:, :-1])], hessian=False)
    path = save_act_norms(tmp_path / "norms", calib)
    method = AdaptiveSparseTraining(cfg_of(*AST, "model.weight_sparsity.score=wanda",
                                           f"model.weight_sparsity.act_norms={path}"))
    flat = leaves_by_path(method.prepare(state["params"]))
    differs_from_magnitude = 0
    for p, mask in flat.items():
        if p[-1] != "mask":
            continue
        w = np.asarray(flat[p[:-1] + ("weight",)], np.float64)
        norm = np.asarray(calib[p[1]][p[2:-1]]["act_norm"], np.float64)
        score = (np.abs(w) * norm[:, None]).reshape(-1, 4, w.shape[1])  # groups of 4 inputs per output
        top2 = np.argsort(-score, axis=1, kind="stable")[:, :2, :]
        want = np.zeros_like(score, bool)
        np.put_along_axis(want, top2, True, axis=1)
        np.testing.assert_array_equal(np.asarray(mask), want.reshape(w.shape))
        differs_from_magnitude += int(np.sum(np.asarray(mask) != np.asarray(nm_mask(jnp.abs(w)))))
    assert differs_from_magnitude > 0


def test_wanda_without_norms_is_a_one_line_error():
    with pytest.raises(ConfigError, match="score: wanda needs model.weight_sparsity.act_norms"):
        AdaptiveSparseTraining(cfg_of(*AST, "model.weight_sparsity.score=wanda"))


# --- SquareHead ----------------------------------------------------------------------------------------------

def test_squarehead_is_the_authors_layerwise_loss():
    """``Σ_l mean((s_l − t_l)²) / (mean(t_l²) + ε)`` (their ``layerwise_loss``), in float64 numpy; the sum over
    tokens divided by their count is that value; with 0/1 target weights only the counted tokens enter."""
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(3, 2, 5, 8)), 0.3 * rng.normal(size=(3, 2, 5, 8))
    want = sum(np.mean((s[l] - t[l]) ** 2) / (np.mean(t[l] ** 2) + 2.0 ** -7) for l in range(3))
    got = float(squarehead_loss_sum(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))) / (2 * 5)
    assert got == pytest.approx(want, rel=1e-5)
    assert SQUAREHEAD_EPS == 0.0078125  # torch.finfo(torch.bfloat16).eps
    w = (rng.random((2, 5)) < 0.5).astype(np.float32)
    keep = w.astype(bool)
    want_w = sum(np.mean((s[l][keep] - t[l][keep]) ** 2) / (np.mean(t[l][keep] ** 2) + 2.0 ** -7) for l in range(3))
    got_w = float(squarehead_loss_sum(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(w))) / w.sum()
    assert got_w == pytest.approx(want_w, rel=1e-5)


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scan_layers"])
def test_hidden_states_are_the_residual_stream_after_each_block(scan):
    cfg = cfg_of(f"model.scan_layers={str(scan).lower()}")
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    tokens = batch_of(cfg)[:, :-1]
    logits, stats = model(tokens, return_stats=True, return_hidden=True)
    hidden = stats["by_layer"]["hidden"]
    assert hidden.shape == (2, *tokens.shape, 32) and "hidden" not in stats
    np.testing.assert_allclose(np.asarray(model.norm(hidden[-1]) @ model.lm_head[...]), np.asarray(logits),
                               rtol=1e-5, atol=1e-5)
    if scan:
        return
    first = model.layers[0](jnp.take(model.embed[...], tokens, axis=0), None, None)
    np.testing.assert_allclose(np.asarray(hidden[0]), np.asarray(first), rtol=1e-5, atol=1e-6)


def test_squarehead_in_a_train_step_is_the_layerwise_loss_of_both_models_hidden_states(dense_and_pruned):
    """A 2:4 student of the dense teacher's weights: the step's ``squarehead`` metric is the authors' formula
    (numpy) over the two models' residual streams, and the loss is CE + KD + SquareHead."""
    src, dense, _ = dense_and_pruned
    s, state = setup(cfg_of(*AST, f"train.distill.teacher={src}", "train.distill.squarehead=2.0"))
    consts = {m.name: c for m in s.methods if (c := m.constants(s.mesh)) is not None}
    start = s.start(_load_into(state["params"], dict(dense)))
    tokens = batch_of(s.cfg)[:, :-1]
    hidden = lambda model: np.asarray(model(tokens, return_stats=True, return_hidden=True)[1]["by_layer"]["hidden"],
                                      np.float64)
    hs, ht = hidden(nnx.merge(s.graphdef, start["params"])), hidden(nnx.merge(s.methods[-1].graphdef, consts["distill"]))
    want = 2.0 * sum(np.mean((hs[l] - ht[l]) ** 2) / (np.mean(ht[l] ** 2) + 2.0 ** -7) for l in range(2))
    _, m = make_train_step(s, consts)(start, batch_of(s.cfg))
    assert want > 1e-4 and float(m["squarehead"]) == pytest.approx(want, rel=1e-4)
    np.testing.assert_allclose(float(m["loss"]), float(m["ce"]) + float(m["kd"]) + float(m["squarehead"]), rtol=1e-5)
