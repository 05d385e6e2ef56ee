"""Prepared corpora: tokenize once, memory-map, mix; identical bytes however the work was split or killed."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qsparse_jax.config import DataConfig, MixtureSource
from qsparse_jax.errors import DataError
from qsparse_jax.data.pipeline import Mixture, load_splits, tokenize_corpus, train_dataset
from qsparse_jax.cli.prepare import main as prepare_main
from qsparse_jax.data.shards import ShardedTokens

ROOT = Path(__file__).resolve().parents[2]
QSPARSE = str(Path(sys.executable).with_name("qsparse"))  # the console script, as a user runs it
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _text(rng, n_words):
    return " ".join(rng.choice(WORDS, n_words)) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~0.8 MB: text files, plain / gzip JSONL, in nested directories, plus a file of unknown type."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for d in range(3):
        sub = root / f"part{d}"
        sub.mkdir()
        for i in range(12):
            (sub / f"doc{i}.txt").write_text(_text(rng, 3000))
        lines = [json.dumps({"text": _text(rng, 400), "id": i}) for i in range(30)]
        (sub / "records.jsonl").write_text("\n".join(lines) + "\n")
        with gzip.open(sub / "more.jsonl.gz", "wt") as f:
            f.write("\n".join(lines[:10]) + "\n")
    (root / "notes.xyz").write_text("not a corpus file")
    return root


def _prepare(*args) -> int:
    return prepare_main([str(a) for a in args])


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _bpe(tmp_path, corpus) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train([str(p) for p in sorted(corpus.rglob("*.txt"))[:5]],
              trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"]))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_prepared_stdlib_yields_exactly_the_in_memory_tokens_and_batches(tmp_path):
    out = tmp_path / "stdlib"
    # small chunks and shards, so windows cross shard and chunk boundaries
    assert _prepare("--source", "stdlib", "--out", out, "--chunk_mb", 4, "--shard_tokens", 1_000_003) == 0
    cfg = DataConfig(seq_len=64, batch_size=8, seed=5)
    mem = tokenize_corpus(cfg)
    prep = load_splits(DataConfig(source=str(out), seq_len=64, batch_size=8, seed=5))
    assert isinstance(prep.train, ShardedTokens) and len(prep.train.files) > 8
    np.testing.assert_array_equal(prep.train[:], mem.train)
    np.testing.assert_array_equal(prep.val[:], mem.val)
    assert prep.n_docs == mem.n_docs and prep.vocab_size == 256
    a, b = iter(train_dataset(mem.train, cfg)), iter(train_dataset(prep.train, cfg))
    for _ in range(5):
        x, y = next(a), next(b)
        assert x.dtype == y.dtype == np.int32
        np.testing.assert_array_equal(x, y)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["fingerprint"] == "byte"
    assert manifest["splits"]["train"]["tokens"] == len(mem.train)
    assert all(s["tokens"] <= 1_000_003 for s in manifest["splits"]["train"]["shards"])


def test_sharded_tokens_slices_across_shards(tmp_path, corpus):
    out = tmp_path / "p"
    assert _prepare("--source", corpus, "--out", out, "--shard_tokens", 1000, "--chunk_mb", 0.3) == 0
    t = ShardedTokens(out, "train")
    full = t[:]
    rng = np.random.default_rng(1)
    for _ in range(200):
        a = int(rng.integers(0, len(t)))
        b = int(rng.integers(a, min(a + 5000, len(t)) + 1))
        np.testing.assert_array_equal(t[a:b], full[a:b])


def test_parquet_zstd_gzip_and_text_inputs_are_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    src = tmp_path / "src"
    src.mkdir()
    texts = [f"parquet document {i} " * (i + 3) for i in range(50)]
    table = pa.table({"id": list(range(50)), "content": texts[:25] + [None] + texts[26:]})
    pq.write_table(table, src / "a.parquet", row_group_size=7)  # 8 row groups
    zl = [f"zstd line {i} " * 20 for i in range(20)]
    (src / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "\n".join(json.dumps({"content": t}) for t in zl).encode()))
    (src / "c.txt").write_text("a plain text document")
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert _prepare("--source", src, "--out", whole, "--text_field", "content", "--val_fraction", 0) == 0
    # a Parquet file larger than a chunk is split by row groups: same tokens
    assert _prepare("--source", src, "--out", split, "--text_field", "content", "--val_fraction", 0,
                    "--chunk_mb", 0.0005) == 0
    assert json.loads((split / "prepare.json").read_text())["chunks"] > 3
    want = b"".join(t.encode() + b"\0" for t in texts[:25] + texts[26:] + zl + ["a plain text document"])
    for out in (whole, split):
        got = ShardedTokens(out, "train")[:]
        assert bytes(got.astype(np.uint8)) == want


def test_killed_prepare_rerun_gives_byte_identical_shards(tmp_path, corpus):
    tok = _bpe(tmp_path, corpus)
    args = ["--source", str(corpus), "--tokenizer", str(tok), "--chunk_mb", 0.05, "--shard_tokens", 20_000,
            "--workers", 1]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert _prepare(*args, "--out", clean) == 0
    proc = subprocess.Popen([QSPARSE, "prepare", *map(str, args), "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 60
    while not (killed / "chunks").is_dir() or not any((killed / "chunks").glob("*.json")):
        assert proc.poll() is None and time.time() < deadline, "prepare ended before it could be killed"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_chunks = json.loads((clean / "prepare.json").read_text())["chunks"]
    assert not (killed / "manifest.json").exists() and len(list((killed / "chunks").glob("*.json"))) < n_chunks
    with pytest.raises(DataError, match="unfinished prepare"):
        load_splits(DataConfig(source=str(killed), tokenizer=str(tok)))
    assert _prepare(*args, "--out", killed) == 0
    assert _files(killed) == _files(clean)
    assert not list(killed.rglob("*.tmp"))


def test_two_parts_in_two_processes_give_the_one_process_dataset(tmp_path, corpus):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--source", str(corpus), "--chunk_mb", 0.1, "--shard_tokens", 50_000]
    assert _prepare(*common, "--out", one) == 0
    procs = [subprocess.Popen([QSPARSE, "prepare", *map(str, common), "--out", str(two),
                               "--shard_index", str(i), "--num_shards", "2"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert json.loads((one / "prepare.json").read_text())["chunks"] >= 4
    assert _files(two) == _files(one)


def test_mixture_proportions_and_counts(tmp_path, corpus):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _prepare("--source", corpus / "part0", "--out", a, "--val_fraction", 0.2) == 0
    assert _prepare("--source", corpus / "part1", "--out", b, "--val_fraction", 0.2) == 0
    cfg = DataConfig(seq_len=32, batch_size=8, mixture=[MixtureSource(str(a), 0.7), MixtureSource(str(b), 0.3)])
    splits = load_splits(cfg)
    mix = splits.mixture
    assert isinstance(mix, Mixture) and splits.weights == {"a": 0.7, "b": 0.3}
    picks = np.asarray([mix.locate(r)[0] for r in range(10_000)])
    share = np.bincount(picks, minlength=2) / len(picks)
    assert abs(share[0] - 0.7) <= 0.02 and abs(share[1] - 0.3) <= 0.02
    np.testing.assert_array_equal(mix.counts(10_000), np.bincount(picks, minlength=2))
    np.testing.assert_array_equal(mix.counts(1234), np.bincount(picks[:1234], minlength=2))
    # every block of 1000 rows takes the next 700 rows of source a, each once
    rows_a = [mix.locate(r)[1] for r in range(10_000) if picks[r] == 0]
    assert sorted(rows_a) == list(range(7000))
    # rows really come from their source
    r = int(np.flatnonzero(picks == 1)[0])
    row = mix[r]
    assert row.shape == (33,) and any(np.array_equal(row, w) for w in _windows(ShardedTokens(b, "train"), 32))


def _windows(tokens, seq_len):
    full = tokens[:]
    return [full[i * seq_len:i * seq_len + seq_len + 1] for i in range((len(full) - 1) // seq_len)]


def test_resumed_mixture_iterator_sees_the_same_batches(tmp_path, corpus):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _prepare("--source", corpus / "part0", "--out", a, "--val_fraction", 0.2) == 0
    assert _prepare("--source", corpus / "part2", "--out", b, "--val_fraction", 0.2) == 0
    cfg = DataConfig(seq_len=16, batch_size=4, seed=1, mixture=[MixtureSource(str(a), 1), MixtureSource(str(b), 3)])
    train = load_splits(cfg).train
    it = iter(train_dataset(train, cfg))
    first = [next(it) for _ in range(4)]
    state = it.get_state()
    rest = [next(it) for _ in range(4)]
    resumed = iter(train_dataset(load_splits(cfg).train, cfg))
    resumed.set_state(state)
    for want in rest:
        np.testing.assert_array_equal(next(resumed), want)
    again = iter(train_dataset(train, cfg))
    np.testing.assert_array_equal(next(again), first[0])


def test_training_on_a_mixture_logs_tokens_and_validation_per_source(tmp_path, corpus):
    from qsparse_jax.config import load_config
    from qsparse_jax.train.loop import train

    a, b = tmp_path / "a", tmp_path / "b"
    assert _prepare("--source", corpus / "part0", "--out", a, "--val_fraction", 0.2) == 0
    assert _prepare("--source", corpus / "part1", "--out", b, "--val_fraction", 0.2) == 0
    small = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=2", "model.hidden_dim=64",
             "data.seq_len=32", "data.batch_size=8", "train.steps=4", "train.log_every=1", "train.eval_every=2",
             "train.eval_batches=1", "checkpoint.every=0", "optim.warmup_steps=1",
             f"data.mixture=[{{source: {a}, weight: 3}}, {{source: {b}, weight: 1}}]"]
    cfg = load_config(str(ROOT / "configs/tiny.yaml"), small)
    train(cfg, tmp_path / "run")
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    last = logged[-1]
    assert sum(last["tokens_by_source"].values()) == 4 * 8 * 32 and last["tokens_by_source"]["a"] > 0
    assert set(last["val_loss_by_source"]) == {"a", "b"}
    assert last["val_loss"] == pytest.approx(0.75 * last["val_loss_by_source"]["a"] + 0.25 * last["val_loss_by_source"]["b"])
    assert 0 <= last["host_fraction"] < 1


# --- one-line errors, exit 2 ---------------------------------------------------------------------

def _one_line_error(capsys, rc):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_prepare_inputs_exit_2_with_one_line(tmp_path, corpus, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "empty").mkdir()
    (tmp_path / "x.csv").write_text("a,b\n")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    cases = [
        (["--source", tmp_path / "x.csv"], "unknown file type"),
        (["--source", tmp_path / "empty"], "is empty"),
        (["--source", tmp_path / "nope"], "no such file or directory"),
        (["--source", tmp_path / "t.parquet"], "no column 'text' (columns: body)"),
        (["--source", corpus, "--tokenizer", tmp_path / "missing.json"], "no such file"),
        (["--source", corpus, "--shard_index", 2, "--num_shards", 2], "--shard_index must be in [0, --num_shards=2)"),
    ]
    for args, msg in cases:
        assert msg in _one_line_error(capsys, _prepare(*args, "--out", tmp_path / "o")), msg
    out = tmp_path / "done"
    assert _prepare("--source", corpus / "part0", "--out", out, "--val_fraction", 0.2) == 0
    capsys.readouterr()
    err = _one_line_error(capsys, _prepare("--source", corpus / "part0", "--out", out, "--val_fraction", 0.5))
    assert "prepared with other arguments" in err and "val_fraction" in err
    assert f"delete {out} or choose another --out" in err


def test_bad_prepared_corpora_are_one_line_errors_in_training(tmp_path, corpus, capsys):
    from qsparse_jax.cli.train import main as train_main

    out = tmp_path / "p"
    assert _prepare("--source", corpus, "--out", out, "--shard_tokens", 100_000) == 0
    capsys.readouterr()
    run = lambda *over: train_main(["--config", str(ROOT / "configs/tiny.yaml"), "--workdir", str(tmp_path / "w"),
                                    f"data.source={out}", *over])
    tok = _bpe(tmp_path, corpus)
    assert "was prepared with tokenizer byte" in _one_line_error(capsys, run(f"data.tokenizer={tok}"))
    bpe = tmp_path / "bpe"
    assert _prepare("--source", corpus / "part0", "--out", bpe, "--tokenizer", tok, "--val_fraction", 0.2) == 0
    capsys.readouterr()
    err = _one_line_error(capsys, train_main(["--config", str(ROOT / "configs/tiny.yaml"), "--workdir",
                                              str(tmp_path / "w"), f"data.source={bpe}", "data.val_fraction=0.2"]))
    assert "set data.tokenizer=" + str(bpe / "tokenizer.json") in err
    # vocab: the tokenizer's vocabulary against a smaller embedding
    vocab = json.loads((bpe / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    err = _one_line_error(capsys, train_main(["--config", str(ROOT / "configs/tiny.yaml"), "--workdir",
                                              str(tmp_path / "w"), f"data.source={bpe}",
                                              f"data.tokenizer={bpe / 'tokenizer.json'}", f"model.vocab_size={vocab - 1}",
                                              "data.val_fraction=0.2"]))
    assert f"has {vocab} tokens but model.vocab_size={vocab - 1}" in err
    shards = sorted((out / "train").glob("*.bin"))
    shards[2].unlink()
    assert f"shard {shards[2].name} of the train split is missing" in _one_line_error(capsys, run())
    with open(shards[1], "r+b") as f:  # checked before shard 2
        f.truncate(1000)
    assert f"shard {shards[1].name} is truncated" in _one_line_error(capsys, run())
    (out / "manifest.json").unlink()
    assert "is an unfinished prepare" in _one_line_error(capsys, run())
    assert not (tmp_path / "w" / "checkpoints").exists()
