"""Weight decay spares the parameters a method adds (the ``no_decay`` hook): LTE's routers, AST's SLoRB."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qsparse_jax.config import load_config
from qsparse_jax.train.methods.base import leaves_by_path
from qsparse_jax.train.step import setup, trainable

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.hidden_dim=64", "model.max_seq_len=32",
         "data.seq_len=32", "data.batch_size=8", "optim.schedule=constant", "optim.warmup_steps=0", "optim.lr=0.01",
         "optim.weight_decay=0.1"]
CASES = {
    "lte-routers": ("lte-tiny-stage1.yaml", [], lambda p: "router" in p),
    "ast-slorb": ("ast-tiny.yaml", ["model.weight_sparsity.slorb=true", "model.weight_sparsity.slorb_group=8",
                                    "model.weight_sparsity.slorb_train_x=true", "model.sparsity.qkv=0",
                                    "model.sparsity.out=0", "model.sparsity.gate_up=0", "model.sparsity.down=0"],
                  lambda p: p[-1] in ("slorb_s", "slorb_x")),
}


@pytest.mark.parametrize("case", CASES)
def test_decay_alone_shrinks_the_matrices_but_not_a_methods_own_parameters(case):
    """Zero gradient, lr > 0, weight decay > 0: AdamW's update is the decay alone, ``−lr·wd·p``."""
    config, extra, own = CASES[case]
    cfg = load_config(str(ROOT / "configs" / config), [*SMALL, *extra])
    s, state = setup(cfg)
    params = trainable(state["params"])[0]
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = s.optimizer.update(zeros, state["opt_state"], params)
    before, after = leaves_by_path(params), leaves_by_path(optax.apply_updates(params, updates))
    mine = [p for p in before if own(p)]
    assert mine
    for p, v in before.items():
        v = np.asarray(v)
        if own(p):
            np.testing.assert_array_equal(np.asarray(after[p]), v, err_msg=str(p))
        elif v.ndim >= 2:
            np.testing.assert_allclose(np.asarray(after[p]), v * (1 - 0.01 * 0.1), rtol=1e-6, err_msg=str(p))
        else:  # norms and biases: never decayed
            np.testing.assert_array_equal(np.asarray(after[p]), v, err_msg=str(p))
