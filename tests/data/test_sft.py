"""Supervised fine-tuning data: chat templates, response-only loss, packing with attention boundaries."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsparse_jax import ModelConfig, Transformer, functional
from qsparse_jax.config import DataConfig, load_config
from qsparse_jax.data.tokenizer import ByteTokenizer
from qsparse_jax.errors import DataError
from qsparse_jax.data.sft import ChatFormat, encode_example, load_chat_template, load_sft, pack, read_examples
from qsparse_jax.train.step import _nll_sum, split_batch

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6, of course"}]


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def response_text(ex, tok):
    return tok.decode(ex.tokens[ex.response])


def test_prompt_response_loss_covers_the_response_and_the_end_token_only():
    tok = ByteTokenizer()
    msgs = [{"role": "user", "content": "What is Q-Sparse?"}, {"role": "assistant", "content": "Top-K activations."}]
    ex = encode_example(msgs, tok, ChatFormat(None))
    assert response_text(ex, tok) == "Top-K activations.\n\x00"  # plain template's newline + separator
    assert "What is Q-Sparse?" in tok.decode(ex.tokens[~ex.response])


@pytest.fixture
def hf_tokenizer(tmp_path):
    """A tiny word-level tokenizer.json with ChatML special tokens and a tokenizer_config.json template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    words = ["<unk>", "</s>", "<|im_start|>", "<|im_end|>", "\n", "system", "user", "assistant", "Be", "brief.",
             "2+2?", "4", "and", "3+3?", "6,", "of", "course", " "]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="isolated")
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "</s>", "\n"])
    tok.decoder = decoders.Fuse()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": {"content": "</s>"}, "bos_token": None}))
    return tmp_path / "tokenizer.json"


def test_chat_template_renders_as_transformers_does(hf_tokenizer):
    import transformers

    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_tokenizer), chat_template=CHATML)
    fmt = ChatFormat(*load_chat_template(str(hf_tokenizer)))
    for gen in (False, True):
        assert fmt.render(CHAT, gen) == theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)


def test_chat_messages_learn_every_assistant_turn_and_nothing_else(hf_tokenizer):
    from qsparse_jax.data.tokenizer import HFTokenizer

    tok = HFTokenizer(str(hf_tokenizer))
    ex = encode_example(CHAT, tok, ChatFormat(*load_chat_template(str(hf_tokenizer))))
    text = lambda ids: tok._tok.decode([int(i) for i in ids], skip_special_tokens=False)
    assert text(ex.tokens[ex.response]) == "4<|im_end|>\n6, of course<|im_end|>\n</s>"
    prompt = text(ex.tokens[~ex.response])
    assert "2+2?" in prompt and "3+3?" in prompt and "Be brief." in prompt and "6" not in prompt
    assert "<unk>" not in text(ex.tokens) and prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def _examples(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        m = int(rng.integers(3, 20))
        from qsparse_jax.data.sft import Example
        out.append(Example(rng.integers(1, 255, m).astype(np.int32), rng.random(m) < 0.5))
    return out


def test_packing_keeps_every_example_whole_with_restarting_positions_and_segments():
    exs = _examples(40)
    rows, cut = pack(exs, seq_len=31, seed=0)
    assert cut == 0 and rows["tokens"].shape[1] == 32
    found = []
    for r in range(len(rows["tokens"])):
        seg = rows["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
            np.testing.assert_array_equal(rows["positions"][r, where], np.arange(len(where)))
            found.append(tuple(rows["tokens"][r, where]))
        assert np.all(rows["tokens"][r, seg == 0] == 0)  # padding only after the last example
    assert sorted(found) == sorted(tuple(e.tokens) for e in exs)


def test_packed_targets_never_cross_examples_and_follow_the_response_mask():
    exs = _examples(30, seed=1)
    rows, _ = pack(exs, seq_len=47, seed=3)
    seg, w = rows["segment_ids"], rows["weights"]
    crossing = seg[:, 1:] != seg[:, :-1]
    assert not np.any(w[crossing]) and not np.any(w[seg[:, 1:] == 0])
    total = sum(int(e.response[1:].sum()) for e in exs)  # a first token has no in-example context
    assert int(w.sum()) == total


def test_overlong_examples_are_truncated_and_counted():
    from qsparse_jax.data.sft import Example

    rows, cut = pack([Example(np.arange(1, 51, dtype=np.int32), np.ones(50, bool))], seq_len=15, seed=0)
    assert cut == 1 and rows["tokens"].shape == (1, 16)


def test_packed_row_logits_equal_each_example_run_alone():
    """Attention honours segment boundaries and RoPE restarts: packing changes nothing per example."""
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64), rngs=nnx.Rngs(0))
    apply, params = functional(model)
    exs = _examples(3, seed=2)
    rows, _ = pack(exs, seq_len=63, seed=0)
    assert len(rows["tokens"]) == 1
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    inputs, _, kw, _ = split_batch(batch)
    packed = np.asarray(apply(params, inputs, **kw))[0]
    seg = rows["segment_ids"][0, :-1]
    for s in range(1, seg.max() + 1):
        where = np.flatnonzero(seg == s)
        alone = np.asarray(apply(params, jnp.asarray(rows["tokens"][0, where][None])))[0]
        np.testing.assert_allclose(packed[where], alone, atol=2e-5)


def test_loss_is_the_mean_nll_of_response_targets_only():
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64), rngs=nnx.Rngs(1))
    apply, params = functional(model)
    rows, _ = pack(_examples(6, seed=4), seq_len=31, seed=0)
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    total, n = _nll_sum(apply, params, batch)
    inputs, targets, kw, w = split_batch(batch)
    logp = jax.nn.log_softmax(apply(params, inputs, **kw), -1)
    nll = -np.take_along_axis(np.asarray(logp), np.asarray(targets)[..., None], -1)[..., 0]
    mask = np.asarray(w) > 0
    np.testing.assert_allclose(float(total) / float(n), nll[mask].mean(), rtol=1e-5)
    assert 0 < mask.sum() < mask.size


def test_load_sft_splits_packs_and_pads_the_validation_batch(tmp_path):
    recs = [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(30)]
    recs += [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    write_jsonl(tmp_path / "sft.jsonl", recs)
    splits = load_sft(DataConfig(source=str(tmp_path / "sft.jsonl"), task="sft", seq_len=64, batch_size=4,
                                 val_fraction=0.1))
    assert sum(splits.n_docs) == 31 and splits.n_docs[1] >= 1
    assert len(splits.val["tokens"]) >= 4 and splits.train["weights"].sum() > 0


@pytest.mark.parametrize("line, msg", [
    ("not json", "not valid JSON"),
    ('{"prompt": "x"}', "expected {'prompt', 'response'} strings or a non-empty 'messages' list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "each message needs a role in"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
])
def test_bad_records_are_one_line_errors_naming_the_line(tmp_path, line, msg):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "response": "b"}\n' + line + "\n")
    with pytest.raises(DataError, match=msg) as e:
        load_sft(DataConfig(source=str(tmp_path / "d.jsonl"), task="sft", seq_len=32, batch_size=1))
    assert "d.jsonl:2" in str(e.value) and "\n" not in str(e.value)


def test_sft_training_runs_one_epoch_and_reports_response_loss(tmp_path):
    from qsparse_jax.train.loop import train

    recs = [{"prompt": f"Repeat the word {w}.", "response": f"{w} {w}"} for w in
            ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"] * 6]
    write_jsonl(tmp_path / "sft.jsonl", recs)
    cfg = load_config(None, [f"data.source={tmp_path / 'sft.jsonl'}", "data.task=sft", "data.seq_len=64",
                             "data.batch_size=4", "train.epochs=1", "train.log_every=2", "train.eval_every=100",
                             "train.eval_batches=2", "model.dim=32", "model.n_layers=1", "model.n_heads=2",
                             "model.hidden_dim=64", "optim.warmup_steps=1", "checkpoint.async_save=false",
                             "model.sparsity.gate_up=0.5", "model.sparsity.down=0.5"])
    out = train(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # one epoch is every packed training row once: ceil(rows / batch) steps, each logged row one step
    n_rows = len(load_sft(cfg.data).train["tokens"])
    assert [r["step"] for r in rows if "loss" in r] == list(range(2, -(-n_rows // 4) + 1, 2)) and n_rows >= 8
    assert np.isfinite(out["val_loss"]) and rows[-1]["loss"] < rows[0]["loss"] - 0.5  # it learns the task


def test_the_sft_split_does_not_depend_on_where_the_data_lives(tmp_path):
    """The train/validation split hashes each example's place inside data.source, not the absolute path."""
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(40)]
    a = tmp_path / "a" / "chat"
    a.mkdir(parents=True)
    (a / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    b = tmp_path / "elsewhere" / "deeper" / "chat"
    shutil.copytree(a, b)
    splits = []
    for src in (a, b):
        cfg = DataConfig(task="sft", source=str(src), seq_len=64, batch_size=2, val_fraction=0.3)
        ex = read_examples(cfg, ByteTokenizer(), ChatFormat(*load_chat_template("byte")))
        splits.append([e.tokens.tolist() for e in ex[True]])
    assert splits[0] == splits[1] and 0 < len(splits[0]) < 40
