"""LTE (nn/lte.py; ops/experts.py, transforms/lte_convert.py, train/methods/lte.py): experts, the permutation,
stage 1 / stage 2 / MoEfication routing, the expert-gather path, frozen routers, the efficiency loss's control of
sparsity, dense → LTE conversion."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsparse_jax.analysis.lte_probes import layer_sparsity
from qsparse_jax.config import LTEConfig, ModelConfig, load_config
from qsparse_jax.errors import ConfigError
from qsparse_jax.infer.variants import dense_variant, with_execution
from qsparse_jax.nn.lte import LTEFeedForward, ffn_flops_per_token, lte_summary
from qsparse_jax.nn.model import Transformer, with_config
from qsparse_jax.ops.experts import balanced_kmeans, experts_of, group_experts
from qsparse_jax.transforms.lte_convert import convert, permute_model_params, to_lte, write_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(dim=32, hidden_dim=128, n_layers=2, n_heads=2, vocab_size=256, max_seq_len=64)


def tokens(b=2, s=16, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, s), 0, 256)


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


@pytest.mark.parametrize("activation,scan,subln", [("relu2", False, False), ("silu", True, True)])
def test_permutation_leaves_the_model_unchanged(activation, scan, subln):
    cfg = ModelConfig(**TINY, activation=activation, scan_layers=scan, subln=subln)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    t = tokens()
    ref = model(t)
    # the experts' permutation of the dense weights: same function
    pure = nnx.to_pure_dict(nnx.state(model))
    perms = [np.random.default_rng(l).permutation(cfg.hidden_dim) for l in range(cfg.n_layers)]
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, permute_model_params(pure, perms, scan))
    permuted = nnx.merge(nnx.graphdef(model), state)
    np.testing.assert_allclose(permuted(t), ref, atol=2e-5, rtol=1e-5)
    # grouped + permuted into an LTE model that keeps every expert (top-k = E): same function again
    E = cfg.hidden_dim // 16
    lte_model, perms = to_lte(model, LTEConfig(enabled=True, expert_size=16, mode="moefication", top_k=E))
    assert all(sorted(p.tolist()) == list(range(cfg.hidden_dim)) for p in perms)
    np.testing.assert_allclose(lte_model(t), ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(dense_variant(lte_model)(t), ref, atol=2e-5, rtol=1e-5)


def _ffn(activation="relu2", **lte):
    cfg = ModelConfig(**TINY, activation=activation, lte=LTEConfig(enabled=True, expert_size=16, **lte))
    return LTEFeedForward(cfg, rngs=nnx.Rngs(0)), cfg


def _restricted_dense(ffn, x, sel):
    """The dense FFN with each token's unselected experts' neurons zeroed."""
    wg, wu, wd = ffn.w_gate.weight[...], ffn.w_up.weight[...], ffn.w_down.weight[...]
    g = x @ wg
    h = (x @ wu) * (jnp.square(jax.nn.relu(g)) if ffn.activation == "relu2" else jax.nn.silu(g))
    keep = jnp.repeat(sel, ffn.expert_size, axis=-1)
    return jnp.where(keep, h, 0.0) @ wd


@pytest.mark.parametrize("activation", ["relu2", "silu"])
def test_stage2_output_is_the_dense_ffn_restricted_to_the_selected_experts(activation):
    ffn, _ = _ffn(activation, stage=2)
    ffn.router[...] = ffn.router[...] * 50  # scores spread away from 0.5: a realistic selection
    x = jax.random.normal(jax.random.key(2), (3, 5, 32))
    sel = ffn.scores(x) > 0.5
    assert 0 < float(jnp.mean(sel)) < 1
    st = {}
    out = ffn(x, st)
    np.testing.assert_allclose(out, _restricted_dense(ffn, x, sel), atol=1e-5, rtol=1e-5)
    assert float(st["lte_active"]) == float(jnp.sum(sel))
    # stage 1 is the soft mixture Σ G_i E_i(x)
    soft, _ = _ffn(activation, stage=1)
    soft.router[...] = ffn.router[...]
    for name in ("w_gate", "w_up", "w_down"):
        getattr(soft, name).weight[...] = getattr(ffn, name).weight[...]
    s = soft.scores(x)
    wg, wu, wd = ffn.w_gate.weight[...], ffn.w_up.weight[...], ffn.w_down.weight[...]
    g = x @ wg
    h = (x @ wu) * (jnp.square(jax.nn.relu(g)) if activation == "relu2" else jax.nn.silu(g))
    np.testing.assert_allclose(soft(x, None), (h * jnp.repeat(s, 16, axis=-1)) @ wd, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["lte", "moefication"])
def test_expert_gather_path_equals_the_masked_dense_computation(mode):
    kw = dict(stage=2) if mode == "lte" else dict(mode="moefication", top_k=3)
    ffn, cfg = _ffn("silu", **kw)
    ffn.router[...] = ffn.router[...] * 50
    gcfg = cfg.replace(lte=dataclasses.replace(cfg.lte, execution="gather"))
    gathered = LTEFeedForward(gcfg, rngs=nnx.Rngs(0))
    nnx.update(gathered, nnx.state(ffn))
    for shape in [(1, 1, 32), (1, 1, 32), (2, 1, 32), (3, 4, 32)]:  # decode tokens, a batch
        x = jax.random.normal(jax.random.key(sum(shape)), shape)
        st_m, st_g = {}, {}
        np.testing.assert_allclose(jax.jit(lambda x: gathered(x, st_g))(x), ffn(x, st_m), atol=1e-5, rtol=1e-5)
    # one token reads only its own experts: the union is its selection
    x = jax.random.normal(jax.random.key(7), (1, 1, 32))
    st = {}
    gathered(x, st)
    assert float(st["lte_union"]) == float(jnp.sum(ffn.select(ffn.scores(x))))
    assert float(st["lte_union"]) < cfg.hidden_dim // 16


def test_gather_model_decodes_like_the_masked_model():
    cfg = ModelConfig(**TINY, lte=LTEConfig(enabled=True, expert_size=16, stage=2))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    from qsparse_jax.infer.generate import generate
    from qsparse_jax.nn.model import functional

    prompt = np.asarray(tokens(1, 6))
    outs = []
    for m in (model, with_execution(model, "gather")):
        apply, params = functional(m)
        outs.append(generate(apply, params, m.config, prompt, 8, repeats=1)[0])
    np.testing.assert_array_equal(outs[0], outs[1])


SMALL = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.hidden_dim=128", "model.max_seq_len=64",
         "data.seq_len=32", "data.batch_size=8", "checkpoint.every=0", "checkpoint.async_save=false",
         "optim.warmup_steps=0", "model.sparsity.qkv=0", "model.sparsity.out=0", "model.sparsity.gate_up=0",
         "model.sparsity.down=0", "model.lte.enabled=true", "model.lte.expert_size=16"]


def _setup(*extra):
    from qsparse_jax.train.step import make_train_step, setup

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
    from qsparse_jax.train.methods.base import leaves_by_path

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
    from qsparse_jax.train.step import make_stats_step

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
    from qsparse_jax.train.methods import methods_for
    from qsparse_jax.train.step import make_stats_step

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


def test_dense_checkpoint_converts_and_trains_from_init_from(tmp_path):
    from qsparse_jax.train.loop import train

    rng = np.random.default_rng(0)
    (tmp_path / "c").mkdir()
    for i in range(8):
        (tmp_path / "c" / f"d{i}.py").write_text(" ".join(rng.choice(["def", "return", "self", "x", "(", ")"], 400)))
    base = SMALL[:-2] + [f"data.source={tmp_path / 'c'}", "train.log_every=1", "train.eval_every=2",
                         "train.eval_batches=1"]
    dense_cfg = load_config(str(ROOT / "configs/tiny.yaml"), base + ["train.steps=2"])
    write_checkpoint(Transformer(dense_cfg.model, rngs=nnx.Rngs(0)), dense_cfg, tmp_path / "dense")
    summary = convert(str(tmp_path / "lte0"), ckpt=str(tmp_path / "dense" / "checkpoints"),
                        lte=LTEConfig(enabled=True, expert_size=16, mode="moefication", top_k=4), calib_batches=1,
                        fit_steps=20)
    assert summary["experts"] == 8 and len(summary["router_topk_recall"]) == 2
    cfg = load_config(str(tmp_path / "lte0" / "config.yaml"), ["model.lte.mode=lte", "model.lte.top_k=null",
                                                             "model.lte.eta=0.5", "train.steps=2"])
    metrics = train(cfg, tmp_path / "stage1", init_from=str(tmp_path / "lte0" / "checkpoints"))
    assert "ffn_sparsity" in metrics["lte"] and np.isfinite(metrics["val_loss"])


def test_bad_lte_configs_are_one_line_errors():
    with pytest.raises(ConfigError, match="model.lte.stage must be 1"):
        LTEConfig(stage=3)
    with pytest.raises(ConfigError, match="moefication needs top_k"):
        LTEConfig(mode="moefication")
    with pytest.raises(ConfigError, match="expert_size=48 must divide model.hidden_dim=128"):
        Transformer(ModelConfig(**TINY, lte=LTEConfig(enabled=True, expert_size=48)), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="execution=gather needs"):
        Transformer(ModelConfig(**TINY, sparsity={"down": 0.5}, lte=LTEConfig(enabled=True, execution="gather")),
                    rngs=nnx.Rngs(0))


def test_hf_silu_model_groups_into_experts_with_its_outputs_unchanged(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from qsparse_jax.checkpoints.hf import load_pretrained

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation="eager")).float().eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    t = np.random.default_rng(0).integers(0, 97, (2, 11))
    with torch.no_grad():
        ref = hf(torch.as_tensor(t, dtype=torch.long)).logits.numpy()
    model = load_pretrained(tmp_path / "hf")
    assert model.config.activation == "silu"
    lte_model, _ = to_lte(model, LTEConfig(enabled=True, expert_size=16, mode="moefication", top_k=6))
    np.testing.assert_allclose(lte_model(jnp.asarray(t)), ref, atol=1e-4, rtol=1e-4)


MESH_SCRIPT = """
import json, sys
from qsparse_jax.config import load_config
from qsparse_jax.train.loop import train
train(load_config(sys.argv[1], json.loads(sys.argv[2])), sys.argv[3])
"""


def test_stage1_under_a_data_fsdp_tensor_mesh_gives_the_single_device_losses(tmp_path):
    import os
    import subprocess
    import sys

    from qsparse_jax.train.loop import train

    rng = np.random.default_rng(0)
    (tmp_path / "c").mkdir()
    for i in range(8):
        (tmp_path / "c" / f"d{i}.py").write_text(" ".join(rng.choice(["def", "return", "self", "x", "(", ")"], 400)))
    over = SMALL + [f"data.source={tmp_path / 'c'}", "model.lte.eta=0.5", "train.steps=3", "train.log_every=1",
                    "train.eval_every=3", "train.eval_batches=1"]
    train(load_config(str(ROOT / "configs/tiny.yaml"), over), tmp_path / "one")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
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
    from qsparse_jax.checkpoints.native import CheckpointError
    from qsparse_jax.train.loop import train

    (tmp_path / "c").mkdir()
    for i in range(8):
        (tmp_path / "c" / f"d{i}.py").write_text(f"def f{i}(x):\n    return x\n" * 100)
    base = SMALL[:-2] + [f"data.source={tmp_path / 'c'}", "train.steps=1"]
    dense_cfg = load_config(str(ROOT / "configs/tiny.yaml"), base)
    write_checkpoint(Transformer(dense_cfg.model, rngs=nnx.Rngs(0)), dense_cfg, tmp_path / "dense")
    cfg = load_config(str(ROOT / "configs/tiny.yaml"), base + ["model.lte.enabled=true", "model.lte.expert_size=16"])
    with pytest.raises(CheckpointError, match="lacks 2 parameters .*router.*qsparse lte convert"):
        train(cfg, tmp_path / "run", init_from=str(tmp_path / "dense" / "checkpoints"))
