"""The transformer: causality, the pure-functional form, every option under jit and grad, training."""

import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qsparse_jax import ConfigError, ModelConfig, SparsityConfig, Transformer, cross_entropy, functional
from qsparse_jax.config import RopeScaling
from qsparse_jax.nn.layers import rope, rope_frequencies
from qsparse_jax.nn.model import activated_params, measure_sparsity

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from numpy_transformer import Reference  # noqa: E402 (the independent float64 forward, next to this file)

TINY = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48)


def tokens(seed=0, shape=(2, 12), vocab=64):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def build(**kw):
    cfg = ModelConfig(**{**TINY, **kw})
    return Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kw", [{}, dict(sparsity=SparsityConfig.uniform(0.4), act_bits=8, weight_bits="1.58"),
                                dict(sparsity=SparsityConfig.uniform(0.5, block_size=8), subln=True)])
def test_changing_a_future_token_never_changes_past_logits(kw):
    apply, params = functional(build(**kw))
    t = tokens()
    t2 = t.at[:, 7].set((t[:, 7] + 1) % 64)
    a, b = jax.jit(apply)(params, t), jax.jit(apply)(params, t2)
    np.testing.assert_array_equal(a[:, :7], b[:, :7])
    assert not np.allclose(a[:, 7:], b[:, 7:])


def test_segment_ids_block_attention_across_documents():
    apply, params = functional(build())
    model = jax.jit(apply)
    t = tokens(shape=(1, 10))
    seg = jnp.asarray([[0] * 4 + [1] * 6])
    pos = jnp.asarray([list(range(4)) + list(range(6))])
    packed = model(params, t, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(packed[:, 4:], model(params, t[:, 4:]), atol=1e-5)
    np.testing.assert_allclose(packed[:, :4], model(params, t[:, :4]), atol=1e-5)


@pytest.mark.parametrize("scaling", [RopeScaling(), RopeScaling("linear", 4.0), RopeScaling("llama3", 8.0),
                                     RopeScaling("yarn", 4.0, original_max_position_embeddings=32)])
def test_rope_scores_depend_only_on_relative_position(scaling):
    q = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(2), (1, 1, 1, 16))
    inv_freq, scale = rope_frequencies(16, 10000.0, scaling, max_seq_len=128)
    def score(pq, pk):
        return jnp.sum(rope(q, jnp.asarray([[pq]]), inv_freq, scale) * rope(k, jnp.asarray([[pk]]), inv_freq, scale))
    np.testing.assert_allclose(score(3, 1), score(10, 8), rtol=1e-5)
    assert not np.isclose(score(3, 1), score(3, 2))


def test_gqa_equals_attention_with_repeated_kv_heads():
    """With n_kv_heads < n_heads each kv head serves n_heads/n_kv query heads: copying kv weights so
    every query head has its own identical copy (n_kv = n_heads) must give the same logits."""
    gqa = build()
    mha = build(n_kv_heads=4)
    _, gs = nnx.split(gqa)
    _, ms = nnx.split(mha)
    hd = 8
    for i in range(2):
        for name in ("wk", "wv"):
            w = gs["layers"][i]["attn"][name]["weight"][...].reshape(32, 2, 1, hd)
            ms["layers"][i]["attn"][name]["weight"].set_value(jnp.repeat(w, 2, axis=2).reshape(32, 4 * hd))
        for path in (("attn", "wq"), ("attn", "wo"), ("mlp", "w_gate"), ("mlp", "w_up"), ("mlp", "w_down")):
            ms["layers"][i][path[0]][path[1]]["weight"].set_value(gs["layers"][i][path[0]][path[1]]["weight"][...])
    for name in ("embed", "lm_head"):
        ms[name].set_value(gs[name][...])
    nnx.update(mha, ms)
    t = tokens()
    np.testing.assert_allclose(gqa(t), mha(t), atol=1e-5)


def test_functional_apply_matches_module_and_accepts_plain_dicts():
    model = build(sparsity=SparsityConfig.uniform(0.3), act_bits=8)
    apply, params = functional(model)
    t = tokens()
    want = jax.jit(apply)(params, t)
    np.testing.assert_allclose(model(t), want, atol=1e-6)  # eager vs fused: rounding only
    pure = nnx.to_pure_dict(params)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(pure))
    np.testing.assert_array_equal(jax.jit(apply)(pure, t), want)
    # logical axis names ride on every parameter, for sharding
    axes = {"/".join(map(str, p)): v.get_metadata()["logical_axes"] for p, v in nnx.to_flat_state(params)}
    assert axes["embed"] == ("vocab", "embed") and axes["layers/0/mlp/w_down/weight"] == ("mlp", "embed")
    assert axes["layers/0/attn/wk/weight"] == ("embed", "kv") and axes["layers/0/attn/wo/weight"] == ("heads", "embed")


SPARSITY_MODES = {"dense": SparsityConfig(), "topk": SparsityConfig(qkv=0.3, out=0.2, gate_up=0.4, down=0.5),
                  "block": SparsityConfig.uniform(0.5, block_size=8)}
FLAGS = ["subln", "input_norm", "tie_embeddings", "silu", "masked", "l2_preserve", "bf16"]


def combo_flags(i):
    """The flags of combination i: flag j is bit j of (23·i + 59) mod 128, chosen so that every two flags
    meet in all four on/off states and each flag is on and off under every value of each main switch
    (test_option_combinations_cover_every_pair_of_flags). The former cycle (bit j mod 3 of i, flipped
    for i in 8..15) tied silu to bf16 in all 18 combinations: SiLU never ran in float32."""
    return {f for j, f in enumerate(FLAGS) if ((23 * i + 59) % 128 >> j) & 1}


def combo_config(mode, act_bits, weight_bits, i):
    # every combination of the three main switches, each with its own mix of the seven flags
    on = combo_flags(i)
    sp = SPARSITY_MODES[mode]
    if mode != "dense":
        sp = SparsityConfig(**{**sp.__dict__, "grad": "masked" if "masked" in on else "ste",
                               "rescale": "l2_preserve" if "l2_preserve" in on else "none"})
    return dict(sparsity=sp, act_bits=act_bits, weight_bits=weight_bits, subln="subln" in on,
                input_norm="input_norm" in on, tie_embeddings="tie_embeddings" in on,
                activation="silu" if "silu" in on else "relu2", dtype="bfloat16" if "bf16" in on else "float32")


COMBOS = list(itertools.product(SPARSITY_MODES, [None, 8], [None, "1.58", "1"]))


def test_option_combinations_cover_every_pair_of_flags():
    on = [combo_flags(i) for i in range(len(COMBOS))]
    for a, b in itertools.combinations(FLAGS, 2):
        assert {(a in o, b in o) for o in on} == {(x, y) for x in (False, True) for y in (False, True)}, (a, b)
    for f in FLAGS:
        for axis in range(3):
            for value in {c[axis] for c in COMBOS}:
                assert {f in o for o, c in zip(on, COMBOS) if c[axis] == value} == {False, True}, (f, value)


# Smallest distance to a decision boundary the float64 reference must see before its discrete decisions
# can be trusted to be the float32 model's too. Measured on inputs that pass these margins (the jitted
# model's quantizer inputs read back with jax.debug.callback, 8 int8 combinations × their clean seeds
# below 40): its int8-scaled values 127·x/max|x| differ from float64 by <= 1.3e-4 levels, i.e. its
# activations by <= 1e-6 of their row's largest magnitude; ternary / 1-bit decisions read the exact
# parameters and differ only by the float32 error of mean|W| (~1e-7). Each threshold leaves >= 4x room.
BOUNDARY_MARGINS = {"topk": 1e-5, "int8": 5e-4, "ternary": 1e-5, "binary": 1e-6}


def _rescale_params(params, seed=1):
    """Parameters under which every piece of the block moves the logits. At init the RMSNorm weights are
    exactly 1 (a model ignoring them would pass) and every matrix has std 0.02, so the embeddings and
    the attention and GLU branches added to them are tiny and the GLU branch barely shows in the logits
    (ReLU² of 0.1-sized gates). Here: norm weights 1 + 0.5·N(0, 1); projections scaled to unit gain
    (std 1/√fan_in); embeddings to std 1."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(params):
        w = var[...]
        if w.ndim == 1:  # RMSNorm weights
            var.set_value(jnp.asarray(1.0 + 0.5 * rng.standard_normal(w.shape), w.dtype))
        elif path == ("embed",):
            var.set_value(w / jnp.std(w))
        else:  # [in, out] projections and the LM head
            var.set_value(w / (jnp.std(w) * np.sqrt(w.shape[0])))


def _tokens_away_from_boundaries(reference, bf16, shape=(2, 12), tries=100):
    """Tokens (and the reference's logits of all but the last) on which no top-K selection, int8 or
    weight rounding of the reference lies within ``BOUNDARY_MARGINS`` of its boundary: there a float32
    model and the float64 reference cannot decide differently, so the logits must agree to rounding.
    (Near-midpoints do occur: e.g. with quantized weights, int8 activations and no SubLN, the o_proj
    input at position 0 is a copy of v, integer multiples of one step, so an entry of exactly max/2
    lands on 63.5 levels.) The choice looks only at the reference, never at the model; the first clean
    seed is at most 27 for every combination. bfloat16 models round every activation to 8 significant
    bits, so no margin protects them: their tokens are seed 0."""
    for seed in range(1 if bf16 else tries):
        t = tokens(seed, shape=shape)
        ref = reference()
        want = ref.logits(np.asarray(t[:, :-1]))
        if bf16 or all(ref.margins.get(k, np.inf) >= m for k, m in BOUNDARY_MARGINS.items()):
            return t, want
    raise AssertionError(f"no token seed below {tries} keeps the reference away from decision boundaries: {ref.margins}")


@pytest.mark.parametrize("i,combo", list(enumerate(COMBOS)), ids=lambda c: "-".join(map(str, c)) if isinstance(c, tuple) else str(c))
def test_jit_and_grad_with_every_option_combination(i, combo):
    """Every combination under jit and grad: the logits equal an independent float64 numpy forward
    (``numpy_transformer.py``, written from the papers' equations), and gradients reach every layer."""
    kw = combo_config(*combo, i)
    model = build(n_layers=1, **kw)
    apply, params = functional(model)
    _rescale_params(params)
    bf16 = kw["dtype"] == "bfloat16"
    t, want = _tokens_away_from_boundaries(lambda: Reference(model.config, nnx.to_pure_dict(params), bf16=bf16), bf16)

    def loss(p):
        logits = apply(p, t[:, :-1])
        return cross_entropy(logits, t[:, 1:]), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert np.isfinite(value)
    norms = {"/".join(map(str, p)): float(jnp.linalg.norm(v[...].astype(jnp.float32)))
             for p, v in nnx.to_flat_state(grads)}
    assert all(np.isfinite(n) for n in norms.values())
    # gradients reach the first projection through every sparsifier and quantizer
    assert norms["layers/0/attn/wq/weight"] > 0 and norms["embed"] > 0

    # the forward values: per token, the largest logit error relative to the largest logit
    err = np.max(np.abs(np.asarray(logits, np.float64) - want), axis=-1).ravel() / np.max(np.abs(want))
    if not bf16:
        # float32 with every discrete decision shared: rounding only (measured <= 3e-7)
        assert err.max() < 1e-5, err.max()
    else:
        # bfloat16, looser: the reference rounds to bfloat16 after every op as jnp does (run eagerly,
        # the model matches it to ~2e-7 with ReLU²), but jit's XLA fusions keep some intermediates in
        # float32, so values differ by bfloat16 ulps, and an ulp now and then flips a top-K choice or
        # an int8 level, moving that token's logits by up to ~0.15 of the largest. Over 30 token seeds
        # per bfloat16 combination: per-token median <= 0.006, 90th percentile <= 0.041, max <= 0.16
        # (float32: max <= 3e-7). A structural error (a norm or its weight missing, a sparsifier
        # skipped, a wrong kv head) moves most tokens by more; a change of ~1 % (per-tensor instead of
        # per-token int8 scales, no L2 rescale) hides in bfloat16 and is left to the float32 combinations.
        q50, q90 = np.quantile(err, [0.5, 0.9])
        assert q50 < 0.015 and q90 < 0.08 and err.max() < 0.3, (q50, q90, err.max())


def test_tiny_model_loss_falls_with_optax():
    model = build(sparsity=SparsityConfig.uniform(0.3), act_bits=8, weight_bits="1.58")
    apply, params = functional(model)
    text = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 8, np.uint8) % 64
    batch = jnp.asarray(np.stack([text[i:i + 33] for i in range(0, 64, 8)]), jnp.int32)
    opt = optax.adamw(3e-3, b1=0.9, b2=0.95, weight_decay=0.1)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(lambda p: cross_entropy(apply(p, batch[:, :-1]), batch[:, 1:]))(params)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, loss

    losses = []
    for _ in range(40):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[0] > 3.5 and losses[-1] < 0.6 * losses[0], losses


def test_measured_sparsity_matches_top_k():
    cfg = dict(dim=40, hidden_dim=60, n_heads=4, n_kv_heads=2)
    model = build(sparsity=SparsityConfig(qkv=0.3, out=0.25, gate_up=0.4, down=0.5), **cfg)
    s = measure_sparsity(model, tokens())
    assert s["qkv"] == pytest.approx(1 - int(0.7 * 40) / 40)
    assert s["out"] == pytest.approx(1 - int(0.75 * 40) / 40)
    assert s["up"] == s["gate"] == pytest.approx(1 - int(0.6 * 40) / 40)
    assert s["down"] >= 1 - int(0.5 * 60) / 60  # ReLU² may zero more than top-K drops
    apply, params = functional(model)
    assert measure_sparsity(apply, params, tokens()) == s
    dense = measure_sparsity(build(**cfg), tokens())
    assert dense["qkv"] == 0 and dense["down"] > 0.3  # squared ReLU alone is already sparse
    assert s["N_a"] < dense["N_a"] < dense["N_proj"]


def test_activated_parameters_reproduce_the_papers_mistral_numbers():
    mistral = ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                          activation="silu")
    r = activated_params(mistral, {"qkv": 0.420, "out": 0.400, "up": 0.400, "gate": 0.400, "down": 0.604})
    assert r["overall"] == pytest.approx(0.457, abs=5e-4)  # paper: overall 45.7 %
    assert r["N_a"] / 1e9 == pytest.approx(3.8, abs=0.05)  # paper: 3.8B activated
    assert r["N_total"] == 7_241_732_096  # Mistral-7B's parameter count


@pytest.mark.parametrize("kw,msg", [
    (dict(sparsity=SparsityConfig.uniform(0.99)), r"model.sparsity.qkv: sparsity 0.99 keeps no entry out of 32"),
    (dict(n_heads=5, n_kv_heads=5), r"model.n_heads=5 must divide dim=32"),
    (dict(n_kv_heads=3), r"model.n_kv_heads must divide n_heads=4, got 3"),
    (dict(sparsity=SparsityConfig.uniform(0.5, block_size=7)), r"block_size=7 must divide the qkv input size 32"),
    (dict(activation="gelu"), r"model.activation must be one of \('relu2', 'silu'\), got 'gelu'"),
    (dict(weight_bits="2"), r"model.weight_bits must be null or one of"),
    (dict(act_bits=4), r"model.act_bits must be null or 8, got 4"),
    (dict(dim=0), r"model.dim must be a positive integer, got 0"),
    (dict(dtype="float16"), r"model.dtype must be one of"),
])
def test_bad_config_is_one_line_error(kw, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        ModelConfig(**{**TINY, **kw})
    assert "\n" not in str(e.value)


def test_sparsity_values_are_validated():
    with pytest.raises(ConfigError, match=r"sparsity.down must be a number in \[0, 1\), got 1.0"):
        SparsityConfig(down=1.0)
    with pytest.raises(ConfigError, match=r"sparsity.qkv must be a number in \[0, 1\), got -0.1"):
        SparsityConfig(qkv=-0.1)
    with pytest.raises(ConfigError, match="sparsity.grad must be one of"):
        SparsityConfig(grad="vanilla")


@pytest.mark.parametrize("policy", ["full", "dots", "dots_topk"])
def test_remat_recomputes_blocks_with_the_same_gradients(policy):
    """Activation checkpointing per block (jax.checkpoint) changes memory, not the math. (XLA:CPU does
    not shrink its peak memory for it, so only the rematerialization itself is checked here.)"""
    from qsparse_jax.nn.model import with_config

    t = jax.random.randint(jax.random.key(0), (2, 8), 0, 256)
    base = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                   sparsity=SparsityConfig.uniform(0.3)), rngs=nnx.Rngs(0))
    grads, jaxprs = [], []
    for model in (base, with_config(base, remat=policy)):
        apply, params = functional(model)
        f = jax.grad(lambda p: jnp.mean(apply(p, t) ** 2))
        grads.append(jax.jit(f)(params))
        jaxprs.append(str(jax.make_jaxpr(f)(params)))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(b, a, atol=1e-7)
    remat = lambda jaxpr: jaxpr.count("remat") + jaxpr.count("checkpoint")  # the primitive's name varies by jax
    assert remat(jaxprs[0]) == 0 and remat(jaxprs[1]) >= 2  # one per block


def test_remat_dots_topk_runs_each_selection_once():
    """``remat: dots`` recomputes the top-K selections in the backward pass (their outputs feed the weight
    gradients); ``dots_topk`` keeps the outputs, so the compiled gradient runs the selections' search
    loops as often as without remat (once, in the forward pass)."""
    from qsparse_jax.nn.model import with_config

    t = jax.random.randint(jax.random.key(0), (2, 8), 0, 256)

    def while_loops(sparsity):
        """``while`` loops in the compiled forward and in the compiled gradient under each remat policy."""
        base = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                       sparsity=SparsityConfig.uniform(sparsity)), rngs=nnx.Rngs(0))
        loops = {}
        for policy in ("none", "dots", "dots_topk"):
            apply, params = functional(with_config(base, remat=policy))
            f = jax.grad(lambda p: jnp.mean(apply(p, t) ** 2))
            loops[policy] = jax.jit(f).lower(params).compile().as_text().count(" while(")
        loops["forward"] = jax.jit(lambda p: apply(p, t)).lower(params).compile().as_text().count(" while(")
        return loops

    # the selections' loops: those of the Q-Sparse model less those of the same model without top-K (XLA's own)
    sparse, dense = while_loops(0.3), while_loops(0.0)
    selections = {k: sparse[k] - dense[k] for k in sparse}
    assert selections["forward"] >= 2 * 4  # two blocks x (q/k/v, out, gate/up, down inputs): a search loop or more each
    assert selections["none"] == selections["dots_topk"] == selections["forward"]
    assert selections["dots"] > selections["forward"]  # (XLA merges a few of the recomputed loops with the forward ones)


def _scanned_copy(model):
    """The same weights as a ``scan_layers`` model (each Block's parameters stacked on a layer axis)."""
    scan = Transformer(model.config.replace(scan_layers=True), rngs=nnx.Rngs(0))
    pure, target = nnx.to_pure_dict(nnx.state(model)), nnx.state(scan)
    layers = [pure["layers"][i] for i in range(model.config.n_layers)]
    pure["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    nnx.replace_by_pure_dict(target, pure)
    nnx.update(scan, target)
    return scan


@pytest.mark.parametrize("kw", [dict(n_kv_heads=1, sliding_window=3), dict(remat="full"),
                                dict(act_bits=8, weight_bits="1.58", kernels="xla")], ids=["gqa+window", "remat", "kernels"])
def test_scan_over_layers_equals_the_python_loop(kw):
    """nnx.scan over one stacked Block: same logits, gradients, sparsity statistics and KV-cache decoding."""
    from qsparse_jax.nn.decode import init_cache

    loop = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                   sparsity=SparsityConfig.uniform(0.3), **kw), rngs=nnx.Rngs(0))
    scan = _scanned_copy(loop)
    t = jax.random.randint(jax.random.key(0), (2, 7), 0, 256)
    (la, lp), (sa, sp) = functional(loop), functional(scan)
    np.testing.assert_allclose(jax.jit(sa)(sp, t), jax.jit(la)(lp, t), atol=1e-5)
    gl = jax.jit(jax.grad(lambda p: jnp.mean(la(p, t) ** 2)))(lp)
    gs = jax.jit(jax.grad(lambda p: jnp.mean(sa(p, t) ** 2)))(sp)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.to_pure_dict(gl)["layers"][i] for i in range(2)])
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(nnx.to_pure_dict(gs)["layers"])):
        np.testing.assert_allclose(b, a, atol=1e-6)
    assert measure_sparsity(scan, t) == pytest.approx(measure_sparsity(loop, t))
    cache = init_cache(scan.config, 2, 8)
    first, cache = jax.jit(sa)(sp, t[:, :4], cache=cache)
    step, cache = jax.jit(sa)(sp, t[:, 4:5], cache=cache)
    np.testing.assert_allclose(np.concatenate([first, step], 1), jax.jit(la)(lp, t[:, :5]), atol=1e-5)
    assert nnx.state(scan)["layers"]["attn"]["wq"]["weight"].shape == (2, 32, 32)
