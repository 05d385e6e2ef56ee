"""The LTE layer (nn/lte.py): stage 2 is the dense FFN restricted to each token's selected experts and stage 1 the
soft mixture; the expert-gather path (the loop over the union, the tile loop, the ``ragged_dot`` grouped matmul)
equals the masked computation; bad LTE configs are one-line errors.

The experts' grouping: ``tests/ops/test_experts.py``; training (frozen routers, the efficiency loss, metrics):
``tests/train/test_lte_training.py``; dense → LTE: ``tests/transforms/test_lte_convert.py``; gather decoding:
``tests/infer/test_variants.py``."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsparse_jax.config import LTEConfig, ModelConfig
from qsparse_jax.errors import ConfigError
from qsparse_jax.nn.lte import GATHER_IMPLS, LTEFeedForward
from qsparse_jax.nn.model import Transformer

TINY = dict(dim=32, hidden_dim=128, n_layers=2, n_heads=2, vocab_size=256, max_seq_len=64)



def _ffn(activation="relu2", subln=False, **lte):
    cfg = ModelConfig(**TINY, activation=activation, subln=subln, lte=LTEConfig(enabled=True, expert_size=16, **lte))
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


@pytest.mark.parametrize("impl", GATHER_IMPLS)
def test_each_gather_execution_equals_the_masked_path_with_its_zero_counts(impl):
    """The loop over the union, the tile loop and the ``ragged_dot`` grouped matmul (choice 8), with SubLN:
    the output and the down-input zero count of the masked path; a zero token selects no expert."""
    ffn, cfg = _ffn("silu", subln=True, stage=2)
    ffn.router[...] = ffn.router[...] * 50
    ffn.subln.weight[...] = 1 + 0.5 * jax.random.normal(jax.random.key(3), ffn.subln.weight[...].shape)
    gathered = LTEFeedForward(cfg.replace(lte=dataclasses.replace(cfg.lte, execution="gather")), rngs=nnx.Rngs(0))
    nnx.update(gathered, nnx.state(ffn))
    gathered.gather_impl = impl
    x = jax.random.normal(jax.random.key(5), (3, 1, 32)).at[0, 0].set(0.0)  # σ(0) = τ: no expert
    sel = ffn.select(ffn.scores(x))
    assert not sel[0, 0].any() and 0 < float(jnp.mean(sel)) < 1
    assert not jnp.all(jnp.any(sel, axis=(0, 1)))  # some experts unread: their neurons count as zeros
    st_m, st_g = {}, {}
    out = jax.jit(lambda x: (gathered(x, st_g), st_g))(x)
    np.testing.assert_allclose(out[0], ffn(x, st_m), atol=1e-5, rtol=1e-5)
    assert float(out[1]["down"]) == float(st_m["down"])
    assert float(out[1]["lte_union"]) == float(jnp.sum(jnp.any(sel.reshape(-1, sel.shape[-1]), axis=0)))


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
