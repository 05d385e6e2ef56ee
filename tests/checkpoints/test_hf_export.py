"""HF exports lose nothing: tokenizer and top-K travel with the weights, writes are atomic, transformers runs them sparse."""

import json
import os
import stat

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from qsparse_jax import ModelConfig, SparsityConfig, Transformer
from qsparse_jax.checkpoints.hf import import_hf, load_pretrained, save_pretrained
from qsparse_jax.checkpoints.hf_topk import apply_topk
from qsparse_jax.checkpoints.native import write_model_checkpoint
from qsparse_jax.cli import main
from qsparse_jax.config import Config, DataConfig
from qsparse_jax.data.tokenizer import make_tokenizer as open_tokenizer
from qsparse_jax.nn.model import functional
from qsparse_jax.testing.fixtures import make_tokenizer

TEXT = ("the red cat runs over the old stone bridge. a small bird sings in the garden today! "
        "the king reads a letter near the window, slowly. ") * 3
SPARSE = SparsityConfig.uniform(0.4)


def tiny(vocab_size=512, sparsity=SPARSE, **kw):
    cfg = ModelConfig(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                      activation=kw.pop("activation", "relu2"), max_seq_len=64, rope_theta=500.0, init_std=0.1,
                      sparsity=sparsity, **kw)
    return Transformer(cfg, rngs=nnx.Rngs(7))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d, 512)  # byte-level BPE, <s> / </s>, with its tokenizer_config.json
    return d


@pytest.fixture(scope="module")
def run(tmp_path_factory, tok_dir):
    """A Q-Sparse model (keep 60 %) with a 512-token BPE tokenizer, saved as a training checkpoint."""
    model = tiny()
    work = tmp_path_factory.mktemp("run")
    cfg = Config(model=model.config, data=DataConfig.for_model(model.config))
    write_model_checkpoint(model, cfg, work, tokenizer_from=tok_dir)
    text = work / "text.txt"
    text.write_text(TEXT)
    return work


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def eval_rows(capsys, flag, path, text):
    code, out, err = cli(capsys, "eval", flag, path, "--ppl", text, "--batch_size", "4")
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_export_then_eval_hf_scores_like_the_checkpoint_dense_and_sparse(run, tok_dir, tmp_path, capsys):
    code, out, err = cli(capsys, "export-hf", run / "checkpoints", tmp_path / "hf")
    assert code == 0 and err.startswith("note: config.json key 'qsparse' holds the top-K sparsity"), err
    assert "tensors" not in err  # a tiny model exports without progress lines
    native = eval_rows(capsys, "--ckpt", run / "checkpoints", run / "text.txt")
    exported = eval_rows(capsys, "--hf", tmp_path / "hf", run / "text.txt")
    assert set(native) == {"dense", "sparse (S=0.4)"}  # the model's own sparsity: a sparse column
    assert set(exported) == set(native)
    for col in native:
        assert exported[col]["perplexity"] == pytest.approx(native[col]["perplexity"], rel=1e-5), col
    assert native["dense"]["perplexity"] != native["sparse (S=0.4)"]["perplexity"]
    # the tokenizer transformers' AutoTokenizer loads is the one the model was trained with, specials included
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = open_tokenizer(str(tok_dir / "tokenizer.json"))
    assert auto(TEXT, add_special_tokens=False)["input_ids"] == ours.encode(TEXT).tolist()
    assert (auto.bos_token, auto.eos_token) == ("<s>", "</s>")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (auto.bos_token_id, auto.eos_token_id) == (0, 1)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(os.listdir(tmp_path / "hf"))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_config_json_holds_the_sparsity_for_every_model_type_and_import_restores_it(model_type, tok_dir, tmp_path):
    extra = {"mistral": dict(sliding_window=8), "qwen2": dict(qkv_bias=True)}.get(model_type, {})
    sparsity = SparsityConfig(qkv=0.5, out=0.25, gate_up=0.5, down=0.75, block_size=16, rescale="l2_preserve")
    model = tiny(sparsity=sparsity, **extra)
    save_pretrained(model, tmp_path / "hf", model_type=model_type, tokenizer=str(tok_dir / "tokenizer.json"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == model_type
    assert config["qsparse"]["sparsity"] == {"qkv": 0.5, "out": 0.25, "gate_up": 0.5, "down": 0.75, "block_size": 16,
                                             "rescale": "l2_preserve", "grad": "ste", "select": "auto"}
    assert config["qsparse"]["keep"] == {"qkv": 8, "out": 12, "gate_up": 8, "down": 4}  # per block of 16
    assert config["qsparse"]["tokenizer"] == "tokenizer.json"
    assert load_pretrained(tmp_path / "hf").config.sparsity == sparsity
    import yaml

    import_hf(str(tmp_path / "hf"), str(tmp_path / "ws"))
    saved = yaml.safe_load((tmp_path / "ws" / "config.yaml").read_text())
    assert SparsityConfig(**saved["model"]["sparsity"]) == sparsity
    assert saved["data"]["tokenizer"] == str((tmp_path / "ws" / "tokenizer.json").absolute())
    assert (tmp_path / "ws" / "tokenizer_config.json").is_file()  # special tokens kept for the next export


def _modes(path):
    return {p.relative_to(path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [path, *path.rglob("*")]}


def test_export_is_atomic_refuses_a_non_empty_target_and_overwrite_replaces_it_whole(run, tmp_path, capsys):
    dst = tmp_path / "hf"
    dst.mkdir()
    (dst / "model.safetensors.index.json").write_text('{"weight_map": {"model.norm.weight": "gone.safetensors"}}')
    code, out, err = cli(capsys, "export-hf", run / "checkpoints", dst)
    assert code == 2 and err.strip() == (f"error: {dst} is not empty; choose a new directory, or pass --overwrite to "
                                         "replace it whole")
    assert os.listdir(dst) == ["model.safetensors.index.json"]  # untouched
    code, out, err = cli(capsys, "export-hf", run / "checkpoints", dst, "--overwrite")
    assert code == 0, err
    assert "model.safetensors.index.json" not in os.listdir(dst)  # no stale file survives
    load_pretrained(dst)
    modes = _modes(dst)
    assert modes.pop(".") == 0o755 and set(modes.values()) == {0o644}, modes
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary directory left beside it
    # a failing export (here: an architecture that cannot hold the model) leaves the target as it was
    before = {n: (dst / n).read_bytes() for n in os.listdir(dst)}
    code, out, err = cli(capsys, "export-hf", run / "checkpoints", dst, "--overwrite", "--model_type", "bitnet")
    assert code == 2 and err.count("\n") == 1 and "transformers' bitnet always applies SubLN" in err
    assert {n: (dst / n).read_bytes() for n in os.listdir(dst)} == before and sorted(os.listdir(tmp_path)) == ["hf"]
    code, out, err = cli(capsys, "export-hf", run / "checkpoints", run, "--overwrite")
    assert code == 2 and err.startswith(f"error: --overwrite would delete {run}, which holds the checkpoint")


def test_a_model_without_its_tokenizer_is_a_one_line_error_not_a_byte_fallback(run, tmp_path, capsys):
    assert cli(capsys, "export-hf", run / "checkpoints", tmp_path / "hf")[0] == 0
    (tmp_path / "hf" / "tokenizer.json").unlink()
    code, out, err = cli(capsys, "eval", "--hf", tmp_path / "hf", "--ppl", run / "text.txt")
    assert code == 2 and err.strip() == (
        f"error: {tmp_path / 'hf'} has no tokenizer.json and its config.json names one: put the model's "
        "tokenizer.json (and tokenizer_config.json) there, or give --tokenizer")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config["qsparse"]  # a plain HF directory: its vocabulary (512) is not the bytes
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    code, out, err = cli(capsys, "import-hf", tmp_path / "hf", tmp_path / "ws")
    assert code == 2 and err.strip().startswith(f"error: {tmp_path / 'hf'} has no tokenizer.json and its vocab_size "
                                                "512 is not the byte vocabulary (256)") and "\n" not in err.strip()
    assert not (tmp_path / "ws" / "checkpoints").exists()
    # a byte-vocabulary model still reads bytes, and says so once
    save_pretrained(tiny(vocab_size=256), tmp_path / "bytes")
    code, out, err = cli(capsys, "eval", "--hf", tmp_path / "bytes", "--ppl", run / "text.txt", "--seq_len", "32")
    assert code == 0 and err.count("so text is read as UTF-8 bytes") == 1, err


TOKENS = np.random.default_rng(0).integers(0, 512, (2, 13))


BITNET = dict(subln=True, input_norm=True, act_bits=8, weight_bits="1.58")  # top-K after BitLinear's input norm


@pytest.mark.parametrize("sparsity, kw", [
    (SPARSE, dict(activation="silu")),
    (SparsityConfig(qkv=0.5, out=0.25, gate_up=0.5, down=0.75, block_size=16, rescale="l2_preserve"), {}),
    (SPARSE, BITNET),
], ids=["uniform-silu", "block-l2-relu2", "bitnet-input-norm"])
def test_transformers_with_apply_topk_matches_our_sparse_logits(sparsity, kw, tmp_path, monkeypatch):
    if kw.get("act_bits"):  # transformers' BitLinear wraps its int8 quantizer in torch.compile; we compare eager
        monkeypatch.setattr(torch._dynamo.config, "disable", True, raising=False)
    model = tiny(sparsity=sparsity, **kw)
    save_pretrained(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager",
                                                           dtype=torch.float32).eval()
    logits = lambda: hf(torch.as_tensor(TOKENS)).logits.detach().numpy()
    dense = logits()
    handles = apply_topk(hf)
    assert len(handles) == 2 * 7  # every projection of both layers
    apply, params = functional(model)
    ours = np.asarray(apply(params, jnp.asarray(TOKENS)))
    with torch.no_grad():
        np.testing.assert_allclose(logits(), ours, atol=1e-4, rtol=0)
    assert np.abs(dense - ours).max() > 1e-2  # the top-K matters
    for h in handles:
        h.remove()
    np.testing.assert_array_equal(logits(), dense)


def test_progress_is_quiet_at_first_then_plain_lines_off_a_terminal(capsys):
    from qsparse_jax.checkpoints.hf_files import Progress

    quiet = Progress(3, "writing x")
    for _ in range(3):
        quiet.update()
    quiet.close()
    assert capsys.readouterr().err == ""
    loud = Progress(2, "writing y", delay=0.0)  # as a long export is, after its first 10 s
    loud.update()
    loud.update()
    loud.note("saving 1.0 GiB")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["writing y: 1/2 tensors", "writing y: 2/2 tensors",
                                                      "writing y: saving 1.0 GiB"]
