"""Dense → LTE (transforms/lte_convert.py): the experts' permutation and the grouping leave the model's function
unchanged (our models and an HF SiLU one); a converted dense checkpoint trains from ``--init_from``."""

import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsparse_jax.checkpoints.hf import load_pretrained
from qsparse_jax.config import LTEConfig, ModelConfig, load_config
from qsparse_jax.infer.variants import dense_variant
from qsparse_jax.nn.model import Transformer
from qsparse_jax.train.loop import train
from qsparse_jax.transforms.lte_convert import convert, permute_model_params, to_lte, write_checkpoint

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "nn"))
from numpy_transformer import Reference  # noqa: E402 (the independent float64 forward of tests/nn)

TINY = dict(dim=32, hidden_dim=128, n_layers=2, n_heads=2, vocab_size=256, max_seq_len=64)



def tokens(b=2, s=16, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, s), 0, 256)


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


SMALL = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.hidden_dim=128", "model.max_seq_len=64",
         "data.seq_len=32", "data.batch_size=8", "checkpoint.every=0", "checkpoint.async_save=false",
         "optim.warmup_steps=0", "model.sparsity.qkv=0", "model.sparsity.out=0", "model.sparsity.gate_up=0",
         "model.sparsity.down=0", "model.lte.enabled=true", "model.lte.expert_size=16"]


class _FFNInputs(Reference):
    """The independent numpy forward of the dense model, recording each layer's FFN input ``x`` (after the
    norm) and its ReLU² GLU hidden activations ``up(x) ⊙ relu²(gate(x))`` [tokens, hidden]."""

    def __init__(self, config, params):
        super().__init__(config, params)
        self.seen = []

    def feed_forward(self, p, x):
        gate, up = x @ p["w_gate"]["weight"], x @ p["w_up"]["weight"]
        self.seen.append((x.reshape(-1, x.shape[-1]), (up * np.maximum(gate, 0.0) ** 2).reshape(-1, up.shape[-1])))
        return super().feed_forward(p, x)


def test_dense_checkpoint_converts_and_trains_from_init_from(tmp_path):
    import dataclasses

    from qsparse_jax.checkpoints.source import load_model
    from qsparse_jax.nn.model import with_config
    from qsparse_jax.transforms.calibration import calibration_batches

    rng = np.random.default_rng(0)
    (tmp_path / "c").mkdir()
    for i in range(8):
        (tmp_path / "c" / f"d{i}.py").write_text(" ".join(rng.choice(["def", "return", "self", "x", "(", ")"], 400)))
    base = SMALL[:-2] + [f"data.source={tmp_path / 'c'}", "train.log_every=1", "train.eval_every=2",
                         "train.eval_batches=1"]
    dense_cfg = load_config(str(ROOT / "configs/tiny.yaml"), base + ["train.steps=2"])
    dense = Transformer(dense_cfg.model, rngs=nnx.Rngs(0))
    write_checkpoint(dense, dense_cfg, tmp_path / "dense")
    summary = convert(str(tmp_path / "lte0"), ckpt=str(tmp_path / "dense" / "checkpoints"),
                      lte=LTEConfig(enabled=True, expert_size=16, mode="moefication", top_k=4), calib_batches=1,
                      fit_steps=20)
    assert summary["experts"] == 8 and len(summary["router_topk_recall"]) == 2
    converted, cfg0 = load_model(ckpt=str(tmp_path / "lte0" / "checkpoints"))
    assert cfg0.model.lte.top_k == 4 and cfg0.model.activation == "relu2" and not cfg0.model.sparsity.enabled

    # the routers pick the experts that are active: on the calibration tokens, of each token's 4 experts with the
    # largest hidden activations (L2 norm over the expert's neurons) in the dense FFN, recomputed here with the
    # independent numpy forward, the router's top 4 name most (a router that was not fit names half: 4 of 8)
    tokens = np.concatenate([np.asarray(b) for b in calibration_batches(cfg0.data, 1)])
    ref = _FFNInputs(cfg0.model, nnx.to_pure_dict(nnx.state(converted)))
    ref.logits(tokens)
    recall = []
    for (x, h), layer in zip(ref.seen, ref.p["layers"].values()):
        active = np.argsort(-np.linalg.norm(h.reshape(len(h), 8, 16), axis=-1), axis=-1)[:, :4]
        routed = np.argsort(-(x @ layer["mlp"]["router"]), axis=-1)[:, :4]
        recall.append(np.mean([len(set(a) & set(r)) / 4 for a, r in zip(active, routed)]))
    assert min(recall) > 0.8, recall
    np.testing.assert_allclose(summary["router_topk_recall"], recall, atol=0.01)  # what convert reports

    # keeping every expert (top_k = E) is the dense model: its logits, through the permuted, grouped weights
    t = jnp.asarray(tokens[:2])
    every = with_config(converted, lte=dataclasses.replace(cfg0.model.lte, top_k=8))
    np.testing.assert_allclose(every(t), dense(t), atol=2e-5, rtol=1e-5)
    assert not np.allclose(converted(t), dense(t), atol=1e-3)  # top 4: the routing decides

    cfg = load_config(str(tmp_path / "lte0" / "config.yaml"), ["model.lte.mode=lte", "model.lte.top_k=null",
                                                             "model.lte.eta=0.5", "train.steps=2"])
    metrics = train(cfg, tmp_path / "stage1", init_from=str(tmp_path / "lte0" / "checkpoints"))
    assert "ffn_sparsity" in metrics["lte"] and np.isfinite(metrics["val_loss"])


def test_hf_silu_model_groups_into_experts_with_its_outputs_unchanged(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
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
