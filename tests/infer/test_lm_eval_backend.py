"""The ``qsparse_jax`` lm-eval backend against lm-eval's own HF backend on the same tiny random Llama with a
BPE tokenizer trained here and local JSONL tasks (nothing is downloaded): same accuracies, every request's
log-likelihood within 1e-4, the same generations (and transformers' greedy tokens), and our CLI agrees."""

import os
import tempfile

from qsparse_jax.testing.fixtures import OFFLINE_ENV

os.environ.update(OFFLINE_ENV)  # before datasets / lm_eval are imported: no network, a private cache
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="qsparse-test-hf-datasets-"))

import json  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import qsparse_jax.infer.lm_eval_backend  # noqa: E402,F401  (registers "qsparse_jax")
from qsparse_jax.testing import fixtures as bench_eval
from qsparse_jax.cli.eval import main as eval_main

GEN_PROMPTS = ["the cat", "a red bird sees the", "king queen", "water fire earth wind", "the cat", "the cat"]


def _ppl_docs(n=3, words=260, seed=5):
    rng = random.Random(seed)
    return [" ".join(rng.choice(bench_eval.WORDS) for _ in range(words)) for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Model, tasks (multiple choice with empty and space-ending contexts, rolling perplexity with documents
    longer than the 256-token context, greedy generation with a stop sequence) and the --mc JSONL."""
    root = tmp_path_factory.mktemp("lm_eval")
    bench_eval.make_llama(root / "model")
    items = bench_eval.make_mc_items(24, empty_every=6)
    for it in items[1::6]:
        it["context"] += " "  # lm-eval moves the trailing space into the continuation
    mc = bench_eval.write_mc_task(root / "tasks", items)
    bench_eval.write_gen_task(root / "tasks", GEN_PROMPTS, max_gen_toks=10, until=("s",))
    docs = root / "tasks" / "tiny_ppl.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in _ppl_docs()))
    (root / "tasks" / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {docs}\ntest_split: test\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    return root, mc, items


def _evaluate(setup, model, model_args, tasks=("tiny_mc", "tiny_ppl", "tiny_gen"), **kw):
    # only our tasks: indexing lm-eval's thousands of built-in task files takes seconds
    tasks_dir = str(setup[0] / "tasks")
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), batch_size=16,
                                  device="cpu", log_samples=True,
                                  task_manager=TaskManager(include_path=tasks_dir, include_defaults=False), **kw)
    return out["results"], out["samples"], out["config"]


def _resps(samples, task):
    return {s["doc_id"]: [r[0] for r in s["resps"]] for s in samples[task]}


@pytest.fixture(scope="module")
def hf_run(setup):
    return _evaluate(setup, "hf", f"pretrained={setup[0] / 'model'},dtype=float32")


def test_dense_backend_matches_lm_eval_hf_request_by_request(setup, hf_run, capsys):
    root, mc, items = setup
    hf_res, hf_samples, _ = hf_run
    res, samples, config = _evaluate(setup, "qsparse_jax", f"hf={root / 'model'}")
    for metric in ("acc,none", "acc_norm,none"):
        assert res["tiny_mc"][metric] == hf_res["tiny_mc"][metric]
    ours, theirs = _resps(samples, "tiny_mc"), _resps(hf_samples, "tiny_mc")
    assert len(ours) == len(items) and sum(map(len, ours.values())) == 4 * len(items)
    for doc in theirs:
        for (ll, greedy), (ll_hf, greedy_hf) in zip(ours[doc], theirs[doc]):
            assert abs(float(ll) - float(ll_hf)) < 1e-4 and str(greedy) == str(greedy_hf)
    # loglikelihood_rolling: documents longer than the context are scored in windows, as by lm-eval's HF backend
    for doc, (ll,) in _resps(samples, "tiny_ppl").items():
        # a document's log-likelihood is a float32 sum over hundreds of tokens (|ll| ~ 1e3): a few units of
        # float32's 1.2e-7 relative precision (measured 0.84e-7 and 1.27e-7 relative on two machines)
        ll_hf = float(_resps(hf_samples, "tiny_ppl")[doc][0])
        assert abs(float(ll) - ll_hf) <= 5e-7 * abs(ll_hf), (ll, ll_hf)
    assert res["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(hf_res["tiny_ppl"]["bits_per_byte,none"], rel=1e-6)
    # generate_until: greedy through the KV-cache decoder, cut at the stop sequence, the same strings; prompts of
    # four lengths share one decoder per row count (1, and 4 for the three equal prompts plus a padding row)
    assert _resps(samples, "tiny_gen") == _resps(hf_samples, "tiny_gen")
    assert config["qsparse_jax_decoders"] == 2 and config["qsparse_jax_compiles"] <= 8

    # our CLI's dense column is lm-eval's accuracy on the same items; its sparse column is the backend's with
    # the same sparsity given per projection group
    assert eval_main(["--hf", str(root / "model"), "--mc", str(mc), "--sparsity", "0.4"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for col, want in (("dense", hf_res), ("sparse (S=0.4)", _evaluate(
            setup, "qsparse_jax", f"hf={root / 'model'},qkv=0.4,out=0.4,gate_up=0.4,down=0.4", tasks=["tiny_mc"])[0])):
        assert (rows[col]["acc"], rows[col]["acc_norm"]) == (want["tiny_mc"]["acc,none"], want["tiny_mc"]["acc_norm,none"])


def test_greedy_decoding_matches_transformers_token_for_token(setup):
    """The backend's decoder (prompt right-padded to a bucket width, one program for every prompt length)
    produces transformers' greedy tokens."""
    import torch
    import transformers

    from qsparse_jax.config import SparsityConfig
    from qsparse_jax.checkpoints.source import load
    from qsparse_jax.infer.variants import variant
    from qsparse_jax.infer.lm_eval_backend import make_padded_generate

    root = setup[0]
    hf = transformers.LlamaForCausalLM.from_pretrained(root / "model").float().eval()
    ld = load(hf=str(root / "model"))
    apply, params = variant(ld.model, SparsityConfig())
    run = make_padded_generate(apply, apply.config, rows=1, width=16, max_new=12)
    for prompt in sorted(set(GEN_PROMPTS)):
        ids = ld.tokenizer.encode(prompt).astype(np.int32)
        padded = np.zeros((1, 16), np.int32)
        padded[0, :len(ids)] = ids
        ours = np.asarray(run(params, padded, len(ids), jax.random.key(0)))[0]
        with torch.no_grad():
            want = hf.generate(torch.as_tensor(ids[None], dtype=torch.long), max_new_tokens=12, do_sample=False,
                               pad_token_id=1)[0, len(ids):].numpy()
        np.testing.assert_array_equal(ours[:len(want)], want)


def test_checkpoint_with_kernels_scores_like_the_fake_quant_path(setup, tmp_path):
    """A 1.58-bit Q-Sparse training checkpoint (ckpt=RUN/checkpoints) through the packed kernels."""
    from flax import nnx

    from qsparse_jax import ModelConfig, Transformer
    from qsparse_jax.checkpoints.hf import import_hf
    from qsparse_jax.checkpoints.hf import save_pretrained

    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, activation="relu2",
                      subln=True, act_bits=8, weight_bits="1.58", max_seq_len=128)
    save_pretrained(Transformer(cfg, rngs=nnx.Rngs(1)), tmp_path / "bitnet", ternary=True)
    import shutil

    shutil.copy(setup[0] / "model" / "tokenizer.json", tmp_path / "bitnet" / "tokenizer.json")
    ckpt = import_hf(str(tmp_path / "bitnet"), str(tmp_path / "run"))
    lls = {}
    for kernels in ("on", "off"):
        _, samples, _ = _evaluate(setup, "qsparse_jax", f"ckpt={ckpt},kernels={kernels},sparsity=0.5", tasks=["tiny_mc"],
                               limit=4)
        lls[kernels] = np.asarray([float(r[0][0]) for s in samples["tiny_mc"] for r in s["resps"]])
    assert len(lls["on"]) == 16
    # the same sums, rounded differently (int32 accumulator, scales at the end vs float fake-quant)
    np.testing.assert_allclose(lls["on"], lls["off"], atol=1e-4)
    # and "on" reached the model: its projections hold packed ternary weights and run the packed path
    from qsparse_jax.infer.lm_eval_backend import QSparseJaxLM
    from qsparse_jax.kernels import PackedTernary

    for kernels, packed in (("on", True), ("off", False)):
        lm = QSparseJaxLM(ckpt=ckpt, kernels=kernels, sparsity=0.5)
        leaves = jax.tree.leaves(lm.params, is_leaf=lambda x: isinstance(x, PackedTernary))
        assert lm.config.kernels == kernels
        assert sum(isinstance(x, PackedTernary) for x in leaves) == (2 * 7 if packed else 0)  # 7 projections a block


def test_backend_user_errors_are_one_line(setup, capsys):
    from qsparse_jax.errors import ConfigError
    from qsparse_jax.infer.lm_eval_backend import QSparseJaxLM
    from qsparse_jax.cli.lm_eval import main

    root = setup[0]
    for kw, msg in ((dict(hf=root / "model", spasity=0.4), "unknown --model_args key(s) spasity"),
                    (dict(hf=root / "nope"), "hf: no such directory"),
                    (dict(hf=root / "model", sparsity=2), "must be a number in [0, 1)"),
                    (dict(hf=root / "model", batch_size="x"), "batch_size must be a positive integer")):
        with pytest.raises(ConfigError, match=re.escape(msg)):
            QSparseJaxLM(**kw)
    # through lm-eval's CLI: one line, exit status 2
    args = ["--model", "qsparse_jax", "--model_args", f"hf={root / 'model'},spasity=0.4", "--tasks", "tiny_mc",
            "--include_path", str(root / "tasks")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: unknown --model_args key(s) spasity for qsparse_jax; known: "
                       + ", ".join(qsparse_jax.infer.lm_eval_backend.MODEL_ARGS))
