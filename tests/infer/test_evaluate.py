"""Evaluation: lm-eval's request conventions, bucketed batched scoring equal to one-at-a-time scoring with
one compile per bucket, the shared inference loader, and the eval CLI (dense vs sparse, one-line errors)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsparse_jax import ModelConfig, SparsityConfig, Transformer, functional
from qsparse_jax.infer.evaluate import Scorer, bucket_widths, encode_pair, make_batches, mc_metrics, rolling_windows
from qsparse_jax.cli.eval import main


class WordTok:
    """A toy tokenizer: one token per character, but " ab" (space + 'ab') is a single token, so the
    context / continuation boundary matters as it does for BPE."""

    def encode(self, s):
        out, i = [], 0
        while i < len(s):
            if s.startswith(" ab", i):
                out.append(300)
                i += 3
            else:
                out.append(ord(s[i]))
                i += 1
        return np.asarray(out, np.int32)


def test_encode_pair_follows_lm_eval():
    tok = WordTok()
    # continuation tokens are those of context + continuation after the context's
    assert encode_pair(tok.encode, "xy", " ab", 1) == ([120, 121], [300])
    # a trailing space of the context moves to the continuation (so " ab" stays one token)
    assert encode_pair(tok.encode, "xy ", "ab", 1) == ([120, 121], [300])
    # an empty context is the prefix token, unless the continuation already starts with it
    assert encode_pair(tok.encode, "", "q", 1) == ([1], [113])
    assert encode_pair(tok.encode, "", "\x01q", 1) == ([1], [113])


def test_encode_pair_matches_lm_eval_itself():
    from lm_eval.api.model import TemplateLM

    class Fake(TemplateLM):
        eot_token_id = 1
        tok_encode = staticmethod(lambda s, **kw: [int(t) for t in WordTok().encode(s)])
        _loglikelihood_tokens = loglikelihood_rolling = generate_until = None

    cases = [("xy", " ab"), ("xy ", "ab"), ("xy  ", " ab"), ("a\n", "b ab"), ("p ab", "ab ab")]
    for ctx, cont in cases:
        assert encode_pair(WordTok().encode, ctx, cont, 1) == Fake._encode_pair(Fake.__new__(Fake), ctx, cont)


@pytest.mark.parametrize("n", [1, 5, 8, 9, 17, 40])
def test_rolling_windows_are_lm_eval_windows_and_predict_every_token_once(n):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    toks = list(range(10, 10 + n))
    ours = rolling_windows(toks, 1, 8)
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(toks, 1, 8, 1)]
    assert ours == theirs
    assert sum((cont for _, cont in ours), []) == toks
    assert all(len(ctx) + len(cont) - 1 <= 8 for ctx, cont in ours)


def test_bucket_widths_are_few_and_pad_at_most_half():
    w = bucket_widths(2048)
    assert w[0] == 16 and w[-1] == 2048 and len(w) <= 2 * 7 + 1
    assert all(b <= 1.5 * a for a, b in zip(w, w[1:]))


def _tiny(**kw):
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_seq_len=64, **kw)
    return functional(Transformer(cfg, rngs=nnx.Rngs(0)))


def test_bucketed_batches_score_like_one_request_at_a_time_with_one_compile_per_bucket():
    """With top-K sparsity (per token, so padding rows and positions never change real ones)."""
    apply, params = _tiny(sparsity=SparsityConfig.uniform(0.5))
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(2, 64, rng.integers(1, 40)).tolist(), rng.integers(2, 64, rng.integers(1, 6)).tolist())
             for _ in range(37)]
    batches = make_batches(pairs, max_length=24, batch_size=8)
    scorer = Scorer(apply, params)
    ll, greedy = scorer(batches)
    assert scorer.compiles == batches.buckets == len(bucket_widths(24)) == 2
    # reference: every request alone in its row of one plain batch at full width (no sorting, no buckets)
    seqs = [(ctx + cont)[-25:] for ctx, cont in pairs]  # left truncation to max_length + 1
    full = np.zeros((len(pairs), 24), np.int32)
    for i, seq in enumerate(seqs):
        full[i, :len(seq) - 1] = seq[:-1]
    logp = np.asarray(jax.nn.log_softmax(jax.jit(apply)(params, jnp.asarray(full)), -1))
    for i, ((ctx, cont), seq) in enumerate(zip(pairs, seqs)):
        pos = np.arange(len(seq) - 1 - len(cont), len(seq) - 1)
        assert ll[i] == pytest.approx(float(logp[i, pos, np.asarray(seq)[pos + 1]].sum()), abs=2e-5)
        assert greedy[i] == all(logp[i, pos].argmax(-1) == np.asarray(seq)[pos + 1])
    scorer(batches)  # scoring again compiles nothing new
    assert scorer.compiles == batches.buckets


def test_mc_metrics_normalize_as_lm_eval():
    items = [{"context": "c", "choices": ["aaaa", "b"], "label": 1}]
    ll = np.asarray([-4.0, -2.0])  # per character: -1 vs -2; per token (4 vs 1 tokens): -1 vs -2
    m = mc_metrics(items, ll, [4, 1])
    assert m == {"acc": 1.0, "acc_norm": 0.0, "acc_bytes": 0.0, "acc_per_token": 0.0}
    multibyte = [{"context": "c", "choices": ["é", "ab"], "label": 0}]  # 1 char / 2 bytes vs 2 chars / 2 bytes
    m = mc_metrics(multibyte, np.asarray([-1.5, -2.5]), [1, 1])
    assert m["acc_norm"] == 0.0 and m["acc_bytes"] == 1.0


# --- the CLI and the loader ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def byte_llama(tmp_path_factory):
    import torch
    import transformers

    path = tmp_path_factory.mktemp("hf")
    torch.manual_seed(2)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(cfg).float().eval()
    hf.save_pretrained(path)
    return path, hf


def _run(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_cli_perplexity_and_multiple_choice_dense_vs_sparse(byte_llama, tmp_path, capsys):
    import torch

    from qsparse_jax.checkpoints.source import load
    from qsparse_jax.infer.variants import variant

    path, hf = byte_llama
    (tmp_path / "text.txt").write_text("the cat sat on the mat. " * 12)
    items = [{"context": "the cat sat on the", "choices": ["mat", "moon", "xyzzy"], "label": 0},
             {"context": "one two ", "choices": ["three", "four"], "label": 1},
             {"context": "", "choices": ["yes", "no"], "label": 0, "target_delimiter": ""}]
    (tmp_path / "mc.jsonl").write_text("\n".join(map(json.dumps, items)))
    code, out, err = _run(capsys, ["--hf", str(path), "--ppl", str(tmp_path / "text.txt"), "--mc",
                                   str(tmp_path / "mc.jsonl"), "--sparsity", "0.4", "--seq_len", "64", "--stats"])
    assert code == 0, err
    rows = json.loads(out.strip().splitlines()[-1])
    dense, sparse = rows["dense"], rows["sparse (S=0.4)"]
    assert 1 < dense["perplexity"] < 1000 and sparse["perplexity"] != dense["perplexity"]
    for r in (dense, sparse):
        assert set(r) == {"perplexity", "bits_per_byte", "acc", "acc_norm", "acc_bytes", "acc_per_token"}
    stats = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("stats: ")]
    assert [s["compiles"] <= s["buckets"] for s in stats] == [True, True]

    # perplexity is transformers' over lm-eval's rolling windows: 288 bytes in windows of 64, byte 0 first
    ld = load(hf=str(path), tokenizer="byte")
    assert ld.prefix_id == 0 and ld.bos_id is None
    ids = list((tmp_path / "text.txt").read_bytes())

    def hf_perplexity():
        total = 0.0
        for ctx, cont in rolling_windows(ids, 0, 64):
            seq = ctx + cont
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.as_tensor([seq[:-1]])).logits[0], -1).numpy()
            total += sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont))
        return np.exp(-total / len(ids))

    assert dense["perplexity"] == pytest.approx(hf_perplexity(), rel=1e-4)
    # the sparse column is Q-Sparse: per-token top-K (keep int(0.6 · in)) of the input of every linear
    # projection of the blocks, here as torch pre-hooks on transformers' model (no code of ours)
    hooks = []
    for mod in hf.model.layers.modules():
        if isinstance(mod, torch.nn.Linear):
            def top_k(_, args, k=int(0.6 * mod.in_features)):
                x = args[0]
                keep = x.abs().topk(k, dim=-1).indices
                return (torch.zeros_like(x).scatter(-1, keep, x.gather(-1, keep)),)
            hooks.append(mod.register_forward_pre_hook(top_k))
    try:
        assert sparse["perplexity"] == pytest.approx(hf_perplexity(), rel=1e-4)
    finally:
        for h in hooks:
            h.remove()
    assert variant(ld.model, SparsityConfig())[0].config.sparsity == SparsityConfig()


@pytest.mark.parametrize("make_args,msg", [
    (lambda p, t: ["--hf", str(t / "nope"), "--mc", str(t / "mc.jsonl")], "hf: no such directory"),
    (lambda p, t: ["--ckpt", str(t / "nope"), "--mc", str(t / "mc.jsonl")], "ckpt: no such directory"),
    (lambda p, t: ["--hf", str(p), "--mc", str(t / "bad.jsonl")], "bad.jsonl:2: expected"),
    (lambda p, t: ["--hf", str(p), "--mc", str(t / "missing.jsonl")], "cannot read --mc file"),
    (lambda p, t: ["--hf", str(p), "--mc", str(t / "mc.jsonl"), "--sparsity", "1.5"], "must be a number in [0, 1)"),
    (lambda p, t: ["--hf", str(p)], "give --ppl FILE and/or --mc FILE"),
])
def test_eval_cli_user_errors_are_one_line(byte_llama, tmp_path, capsys, make_args, msg):
    item = {"context": "a", "choices": ["b", "c"], "label": 0}
    (tmp_path / "mc.jsonl").write_text(json.dumps(item) + "\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps(item) + "\n" + json.dumps({**item, "label": 5}) + "\n")
    code, out, err = _run(capsys, make_args(byte_llama[0], tmp_path) + ["--tokenizer", "byte"])
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and msg in err, err
