"""Execution variants (infer/variants.py): an LTE model run through the expert-gather path decodes the tokens of the
masked model."""

import jax
import numpy as np
from flax import nnx

from qsparse_jax.config import LTEConfig, ModelConfig
from qsparse_jax.infer.generate import generate
from qsparse_jax.infer.variants import with_execution
from qsparse_jax.nn.model import Transformer, functional

TINY = dict(dim=32, hidden_dim=128, n_layers=2, n_heads=2, vocab_size=256, max_seq_len=64)



def tokens(b=2, s=16, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, s), 0, 256)


def test_gather_model_decodes_like_the_masked_model():
    cfg = ModelConfig(**TINY, lte=LTEConfig(enabled=True, expert_size=16, stage=2))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    prompt = np.asarray(tokens(1, 6))
    outs = []
    for m in (model, with_execution(model, "gather")):
        apply, params = functional(m)
        outs.append(generate(apply, params, m.config, prompt, 8, repeats=1)[0])
    np.testing.assert_array_equal(outs[0], outs[1])
