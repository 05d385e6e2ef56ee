"""HF interop: tiny random Llama / Mistral / Qwen2 built with transformers match our logits."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from qsparse_jax.checkpoints.hf import HFError, load_pretrained, pack_bitnet, save_pretrained, unpack_bitnet
from qsparse_jax.checkpoints.hf_topk import apply_topk
from qsparse_jax.config import RopeScaling, SparsityConfig
from qsparse_jax.nn.model import functional

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)

KINDS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rope_theta=10000.0)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(rope_theta=1e6, sliding_window=5)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(rope_theta=1e6, tie_word_embeddings=True)),
}


def make_hf(kind, path):
    cfg_cls, model_cls, extra = KINDS[kind]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**SMALL, **extra, attn_implementation="eager")).float().eval()
    with torch.no_grad():  # random norms and biases too, so every tensor is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(path, safe_serialization=True)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


TOKENS = np.random.default_rng(0).integers(0, 97, (2, 11))


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_match_transformers(kind, tmp_path):
    hf = make_hf(kind, tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    apply, params = functional(ours)
    got = np.asarray(jax.jit(apply)(params, jnp.asarray(TOKENS)))
    np.testing.assert_allclose(got, hf_logits(hf, TOKENS), atol=1e-4, rtol=0)
    assert ours.config.qkv_bias == (kind == "qwen2") and ours.config.activation == "silu"


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_reimport_is_exact_and_transformers_loads_it(kind, tmp_path):
    make_hf(kind, tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    save_pretrained(ours, tmp_path / "out")
    again = load_pretrained(tmp_path / "out")
    a = jax.tree.leaves(functional(ours)[1])
    b = jax.tree.leaves(functional(again)[1])
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").float()
    apply, params = functional(ours)
    np.testing.assert_allclose(hf_logits(reloaded.eval(), TOKENS), np.asarray(apply(params, jnp.asarray(TOKENS))),
                               atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == kind


ROPE_SCALINGS = {
    "linear": dict(rope_type="linear", factor=2.0),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
    "yarn-mscale": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=0.707,
                        mscale_all_dim=0.707, beta_fast=16.0),
}


@pytest.mark.parametrize("scaling", list(ROPE_SCALINGS))
def test_scaled_rope_matches_transformers_beyond_the_original_context(scaling, tmp_path):
    """Long-context RoPE variants (linear, Llama 3.1, YaRN), read from config.json and written back."""
    torch.manual_seed(0)
    params = {**ROPE_SCALINGS[scaling], "rope_theta": 500.0}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SMALL, rope_parameters=params, attn_implementation="eager")).float().eval()
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    tokens = np.random.default_rng(1).integers(0, 97, (1, 48))  # 3x the original context of 16
    ours = load_pretrained(tmp_path / "hf")
    assert ours.config.rope_scaling.type == params["rope_type"]
    apply, p = functional(ours)
    np.testing.assert_allclose(np.asarray(apply(p, jnp.asarray(tokens))), hf_logits(model, tokens), atol=1e-4, rtol=0)
    unscaled, p0 = functional(load_pretrained(tmp_path / "hf", rope_scaling=RopeScaling()))
    assert np.abs(np.asarray(unscaled(p0, jnp.asarray(tokens))) - hf_logits(model, tokens)).max() > 1e-3  # it matters
    save_pretrained(ours, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").float()
    np.testing.assert_allclose(hf_logits(reloaded.eval(), tokens), hf_logits(model, tokens), atol=1e-5, rtol=0)


def test_loading_onto_a_mesh_streams_into_shards(tmp_path):
    from qsparse_jax.config import MeshConfig
    from qsparse_jax.nn.sharding import make_mesh

    hf = make_hf("llama", tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf", mesh=make_mesh(MeshConfig()))
    apply, params = functional(model)
    np.testing.assert_allclose(np.asarray(apply(params, jnp.asarray(TOKENS))), hf_logits(hf, TOKENS), atol=1e-4)


def test_scan_layers_model_loads_onto_a_mesh_and_exports(tmp_path):
    """A scan_layers model (parameters stacked on a layer axis) streams each layer's tensor slices into
    its shards and writes per-layer HF tensors back."""
    from qsparse_jax.config import MeshConfig
    from qsparse_jax.nn.sharding import make_mesh

    hf = make_hf("qwen2", tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf", mesh=make_mesh(MeshConfig()), scan_layers=True)
    apply, params = functional(model)
    np.testing.assert_allclose(np.asarray(apply(params, jnp.asarray(TOKENS))), hf_logits(hf, TOKENS), atol=1e-4)
    save_pretrained(model, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").float()
    np.testing.assert_allclose(hf_logits(reloaded.eval(), TOKENS), hf_logits(hf, TOKENS), atol=1e-5)
    from qsparse_jax.checkpoints.hf import export_hf, import_hf

    cfg_cls, model_cls, _ = KINDS["llama"]
    byte_vocab = model_cls(cfg_cls(**{**SMALL, "vocab_size": 256})).float().eval()  # no tokenizer.json: bytes
    byte_vocab.save_pretrained(tmp_path / "hf256")
    import_hf(str(tmp_path / "hf256"), str(tmp_path / "ws"), scan_layers=True)
    export_hf(str(tmp_path / "ws" / "checkpoints"), str(tmp_path / "back"))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").float()
    np.testing.assert_allclose(hf_logits(back.eval(), TOKENS), hf_logits(byte_vocab, TOKENS), atol=1e-5)


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    make_hf("llama", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    with pytest.raises(HFError, match=r"tensor 'model.embed_tokens.weight' has shape \[97, 64\], expected \[98, 64\]"):
        load_pretrained(tmp_path / "hf", vocab_size=98)
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(HFError, match="unsupported model_type 'gpt2'; supported: llama, mistral, qwen2"):
        load_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "longrope"}}))
    with pytest.raises(HFError, match="RoPE type 'longrope' is not supported; supported: default, linear, llama3, yarn"):
        load_pretrained(tmp_path / "hf")
    with pytest.raises(HFError, match="no config.json in"):
        load_pretrained(tmp_path / "nowhere")
    from safetensors.numpy import load_file, save_file

    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(HFError, match="missing tensor 'model.layers.1.mlp.down_proj.weight' in the checkpoint"):
        load_pretrained(tmp_path / "hf")


def test_import_continue_train_with_q_sparse_export_and_reload(tmp_path):
    """End to end: HF model -> import-hf -> continued training with top-K (keep 60 %) -> export-hf ->
    transformers loads the result and matches our logits."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cfg_cls, model_cls, _ = KINDS["llama"]
    torch.manual_seed(1)
    model_cls(cfg_cls(**{**SMALL, "vocab_size": 256})).float().save_pretrained(tmp_path / "hf")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"{i}.txt").write_text(f"continued training document {i} " * 40)

    def qsparse(*args):  # the console script, as a user runs it
        out = subprocess.run([str(Path(sys.executable).with_name("qsparse")), *args], cwd=root, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    qsparse("import-hf", str(tmp_path / "hf"), str(tmp_path / "imported"))
    keep60 = [f"model.sparsity.{g}=0.4" for g in ("qkv", "out", "gate_up", "down")]
    qsparse("train", "--config", str(tmp_path / "imported" / "config.yaml"), "--workdir", str(tmp_path / "run"),
            "--init_from", str(tmp_path / "imported" / "checkpoints"), f"data.source={corpus}", "data.seq_len=32",
            "data.batch_size=4", "train.steps=3", "train.log_every=1", "train.eval_every=3", "train.eval_batches=1",
            "optim.lr=1e-3", "optim.warmup_steps=0", *keep60)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[-1]["sparsity"]["qkv"] == pytest.approx(1 - int(0.6 * 64) / 64)
    qsparse("export-hf", str(tmp_path / "run" / "checkpoints"), str(tmp_path / "out"))
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").float()
    ours = load_pretrained(tmp_path / "out")
    assert ours.config.sparsity == SparsityConfig.uniform(0.4)  # restored from config.json
    dense = load_pretrained(tmp_path / "out", sparsity=SparsityConfig())
    tokens = np.random.default_rng(1).integers(0, 256, (2, 9))
    np.testing.assert_allclose(hf_logits(exported.eval(), tokens), np.asarray(dense(jnp.asarray(tokens))), atol=1e-4)
    apply_topk(exported)  # and with the top-K hooked in, transformers computes what was trained
    np.testing.assert_allclose(hf_logits(exported, tokens), np.asarray(ours(jnp.asarray(tokens))), atol=1e-4)
    original = load_pretrained(tmp_path / "hf")
    assert not np.allclose(np.asarray(original.embed[...]), np.asarray(ours.embed[...]))  # it was trained


@pytest.mark.parametrize("args,msg", [
    (["import-hf", "/no/such/model", "W"], "error: no config.json in /no/such/model"),
    (["export-hf", "/no/such/ckpt", "D"], "error: no such checkpoint directory: /no/such/ckpt"),
])
def test_convert_cli_errors_are_one_line(tmp_path, args, msg):
    import subprocess
    import sys
    from pathlib import Path

    args = [a if a not in ("W", "D") else str(tmp_path / a) for a in args]
    qsparse = str(Path(sys.executable).with_name("qsparse"))  # the console script, as a user runs it
    out = subprocess.run([qsparse, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == msg


def _bitnet_model(input_norm: bool, subln: bool = True, sparsity: float = 0.0):
    """A tiny BitNet b1.58 model (ReLU² GLU, SubLN, int8 activations, ternary weights), every norm random."""
    from flax import nnx

    from qsparse_jax import ModelConfig, SparsityConfig, Transformer

    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, activation="relu2",
                      subln=subln, input_norm=input_norm, act_bits=8, weight_bits="1.58", rope_theta=500.0,
                      sparsity=SparsityConfig.uniform(sparsity))
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if path[-1] == "weight" and var[...].ndim == 1:
            var.set_value(1.0 + 0.1 * jax.random.normal(jax.random.key(len(path)), var.shape))
    return model


@pytest.fixture
def no_torch_compile(monkeypatch):
    # transformers' BitLinear wraps its int8 quantizer in torch.compile; eager is what we compare against
    monkeypatch.setattr(torch._dynamo.config, "disable", True, raising=False)


@pytest.mark.parametrize("ternary", [True, False], ids=["packed-ternary", "dense-online"])
@pytest.mark.parametrize("input_norm", [False, True], ids=["subln", "subln+bitlinear-norm"])
def test_bitnet_export_loads_in_transformers_with_matching_logits(ternary, input_norm, tmp_path, no_torch_compile):
    model = _bitnet_model(input_norm)
    save_pretrained(model, tmp_path / "out", ternary=ternary)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "bitnet" and config["quantization_config"]["use_rms_norm"] == input_norm
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager",
                                                           dtype=torch.float32).eval()
    apply, params = functional(model)
    ours = np.asarray(apply(params, jnp.asarray(TOKENS)))
    np.testing.assert_allclose(hf_logits(hf, TOKENS), ours, atol=2e-4, rtol=0)


def test_ternary_export_is_2_bit_and_reimport_keeps_levels_and_scales(tmp_path, no_torch_compile):
    from safetensors.numpy import load_file

    from qsparse_jax.ops.quant import quantize_weights

    model = _bitnet_model(input_norm=True, sparsity=0.4)
    save_pretrained(model, tmp_path / "packed", ternary=True)
    save_pretrained(model, tmp_path / "dense")
    packed = load_file(tmp_path / "packed" / "model.safetensors")
    q = packed["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == np.uint8 and q.shape == (64 // 4, 64)
    assert set(np.unique(unpack_bitnet(q))) <= {-1, 0, 1}
    again = load_pretrained(tmp_path / "packed")
    assert again.config.sparsity == model.config.sparsity  # top-K restored from our config key
    a, b = dict(nnx_flat(model)), dict(nnx_flat(again))
    for key in a:  # the weights the model computes with: same ternary levels times the same scale (up to
        # the float32 rounding of mean|w| over the tensor, which the absmean quantizer recomputes)
        if key[-1] == "weight" and a[key].ndim == 2 and key[0] != "embed" and key[0] != "lm_head":
            qa, qb = np.asarray(quantize_weights(a[key])), np.asarray(quantize_weights(b[key]))
            np.testing.assert_array_equal(np.sign(qb), np.sign(qa))
            np.testing.assert_allclose(qb, qa, rtol=1e-5, atol=0)
        else:
            np.testing.assert_array_equal(a[key], b[key])
    save_pretrained(again, tmp_path / "packed2", ternary=True)
    packed2 = load_file(tmp_path / "packed2" / "model.safetensors")
    for name, t in packed.items():
        if t.dtype == np.uint8:
            np.testing.assert_array_equal(packed2[name], t)  # export -> import -> export: same bytes
    size = lambda d: (d / "model.safetensors").stat().st_size
    assert size(tmp_path / "packed") < size(tmp_path / "dense")


def nnx_flat(model):
    from flax import nnx

    return [(k, np.asarray(v[...])) for k, v in nnx.to_flat_state(nnx.state(model))]


def test_pack_bitnet_matches_transformers_layout():
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    levels = np.random.default_rng(0).integers(-1, 2, (24, 7)).astype(np.int8)
    theirs = pack_weights(torch.tensor(levels)).numpy()  # (it adds 1 in place: pass a copy)
    np.testing.assert_array_equal(pack_bitnet(levels), theirs)
    np.testing.assert_array_equal(unpack_bitnet(theirs), unpack_weights(torch.as_tensor(theirs), torch.int8).numpy())


@pytest.mark.parametrize("change, msg", [
    (dict(weight_bits="1"), "bitnet export needs weight_bits '1.58' with act_bits 8"),
    (dict(subln=False), "transformers' bitnet always applies SubLN"),
])
def test_unexportable_models_are_one_line_errors(change, msg, tmp_path):
    model = _bitnet_model(input_norm=False)
    model.config = model.config.replace(**change)
    with pytest.raises(HFError, match=msg):
        save_pretrained(model, tmp_path / "out", ternary=True)
    with pytest.raises(HFError, match="llama holds only SiLU / ReLU² GLU models"):
        save_pretrained(_bitnet_model(input_norm=False), tmp_path / "out", model_type="llama")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def _relu2_model(scan_layers=False, **model):
    """A tiny ReLU² GLU model without SubLN / input norms / quantization (configs/tiny.yaml's architecture),
    every norm random."""
    from flax import nnx

    from qsparse_jax import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, activation="relu2",
                      rope_theta=500.0, scan_layers=scan_layers, **model)
    m = Transformer(cfg, rngs=nnx.Rngs(5))
    for path, var in nnx.to_flat_state(nnx.state(m)):
        if path[-1] == "weight" and "norm" in "".join(map(str, path)):
            var.set_value(1.0 + 0.1 * jax.random.normal(jax.random.key(len(path)), var.shape))
    return m


def _groups_nonzero(t, m=4):
    """[out, in] HF weight: nonzeros in each group of m consecutive inputs."""
    return (t != 0).reshape(t.shape[0], -1, m).sum(-1)


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "2:4"])
@pytest.mark.parametrize("scan_layers", [False, True], ids=["layers", "scan"])
def test_relu2_model_exports_as_llama_and_reimports_as_relu2(pruned, scan_layers, tmp_path):
    from safetensors.numpy import load_file

    from qsparse_jax.transforms.calibration import prune_model

    model = _relu2_model(scan_layers)
    if pruned:
        model, _ = prune_model(model, "magnitude")
    save_pretrained(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["hidden_act"]) == ("llama", ["LlamaForCausalLM"], "relu2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager",
                                                           dtype=torch.float32).eval()
    assert isinstance(hf, transformers.LlamaForCausalLM)
    apply, params = functional(model)
    np.testing.assert_allclose(hf_logits(hf, TOKENS), np.asarray(apply(params, jnp.asarray(TOKENS))), atol=1e-4, rtol=0)
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    for name, t in tensors.items():
        if name.endswith("_proj.weight") and pruned:
            assert np.all(_groups_nonzero(t) == 2), name  # the 2:4 zeros in place
    again = load_pretrained(tmp_path / "out", scan_layers=scan_layers)
    assert again.config.activation == "relu2" and not again.config.subln
    for a, b in zip(jax.tree.leaves(functional(model)[1]), jax.tree.leaves(functional(again)[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("slorb", [None, "S", "S+X"])
def test_ast_model_exports_its_masked_weights_with_slorb_folded(slorb, tmp_path):
    """An AST model computes with W ⊙ M (+ SLoRB): the export writes exactly that, so transformers matches."""
    from flax import nnx
    from safetensors.numpy import load_file

    ws = dict(n=2, m=4, slorb=slorb is not None, slorb_group=16, slorb_train_x=slorb == "S+X")
    model = _relu2_model(weight_sparsity=ws)
    for path, var in nnx.to_flat_state(nnx.state(model)):  # random S and X, so the fold is really tested
        if path[-1] in ("slorb_s", "slorb_x"):
            var.set_value(var[...] + 0.02 * jax.random.normal(jax.random.key(len(path) + 7), var.shape))
    save_pretrained(model, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager",
                                                           dtype=torch.float32).eval()
    apply, params = functional(model)
    np.testing.assert_allclose(hf_logits(hf, TOKENS), np.asarray(apply(params, jnp.asarray(TOKENS))), atol=1e-4, rtol=0)
    q = load_file(tmp_path / "out" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    if slorb is None:  # W ⊙ M: the mask's zeros in place; with SLoRB folded in the weights are dense
        np.testing.assert_array_equal(q != 0, np.asarray(model.layers[0].attn.wq.mask[...]).T)
    else:
        assert np.all(q != 0)
