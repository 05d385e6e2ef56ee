"""Input pipeline: corpora, split, tokenizers, packing, deterministic resumable batches."""

import json

import numpy as np
import pytest

from qsparse_jax.config import DataConfig
from qsparse_jax.data.tokenizer import ByteTokenizer, make_tokenizer
from qsparse_jax.errors import DataError
from qsparse_jax.data.pipeline import Windows, iter_documents, tokenize_corpus, train_dataset, val_batches
from qsparse_jax.data.corpus import is_validation, stdlib_files


def test_embedded_corpus_is_the_stdlib_and_splits_stably():
    files = stdlib_files()
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    names = {n for n, _ in iter_documents(DataConfig())}
    # fixed expectations (any machine, any Python): modules named relative to the stdlib, split by a CRC
    val = {"cmd.py", "json/__init__.py", "ntpath.py", "profile.py", "quopri.py", "rlcompleter.py"}
    train = {"os.py", "abc.py", "ast.py", "json/decoder.py", "collections/__init__.py", "random.py"}
    assert val | train <= names
    assert {n for n in val | train if is_validation(n, 0.02)} == val
    assert 0.015 < sum(is_validation(n, 0.02) for n in names) / len(names) < 0.025
    assert 0 < sum(is_validation(f"doc{i}", 0.1) for i in range(10000)) / 10000 < 0.12


def test_jsonl_and_text_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " * 50}) for i in range(10)))
    (tmp_path / "b.txt").write_text("plain text " * 100)
    docs = list(iter_documents(DataConfig(source=str(tmp_path))))
    assert len(docs) == 11 and docs[0][1].startswith("doc 0")
    (tmp_path / "c.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:1: expected an object with a string field 'text'"):
        list(iter_documents(DataConfig(source=str(tmp_path))))


def test_windows_pack_consecutive_tokens_with_one_token_overlap():
    w = Windows(np.arange(100, dtype=np.int32), seq_len=8)
    assert len(w) == 12
    np.testing.assert_array_equal(w[0], np.arange(9))
    np.testing.assert_array_equal(w[1], np.arange(8, 17))


def test_batches_are_deterministic_and_resume_from_the_iterator_state(tmp_path):
    cfg = DataConfig(seq_len=16, batch_size=4, seed=3)
    tokens = np.arange(2000, dtype=np.int32) % 251
    it = iter(train_dataset(tokens, cfg))
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    rest = [next(it) for _ in range(3)]
    again = iter(train_dataset(tokens, cfg))
    np.testing.assert_array_equal(next(again), first[0])
    resumed = iter(train_dataset(tokens, cfg))
    resumed.set_state(state)
    for want in rest:
        np.testing.assert_array_equal(next(resumed), want)
    other_seed = iter(train_dataset(tokens, DataConfig(seq_len=16, batch_size=4, seed=4)))
    assert not np.array_equal(next(other_seed), first[0])
    assert first[0].shape == (4, 17) and first[0].dtype == np.int32


def test_hf_tokenizer_json_is_used_without_download(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    t = make_tokenizer(str(tmp_path / "tokenizer.json"))
    assert t.vocab_size == 4 and t.separator == 1
    np.testing.assert_array_equal(t.encode("hello world hello"), [2, 3, 2])
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"{i}.txt").write_text("hello world " * 40)
    splits = tokenize_corpus(DataConfig(source=str(docs), tokenizer=str(tmp_path / "tokenizer.json")))
    assert set(np.unique(splits.train)) <= {1, 2, 3} and splits.vocab_size == 4


def test_byte_tokenizer_round_trips_utf8():
    t = ByteTokenizer()
    assert t.decode(t.encode("naïve ✓")) == "naïve ✓"


@pytest.mark.parametrize("cfg,msg", [
    (dict(source="/no/such/dir"), "data.source: no such file or directory"),
    (dict(tokenizer="/no/tokenizer.json"), r"data.tokenizer: no such file '/no/tokenizer.json'"),
])
def test_bad_sources_are_one_line_errors(cfg, msg):
    with pytest.raises(DataError, match=msg):
        tokenize_corpus(DataConfig(**cfg))


def test_too_little_text_for_a_batch_is_an_error():
    with pytest.raises(DataError, match="fewer than data.batch_size=8"):
        train_dataset(np.arange(50, dtype=np.int32), DataConfig(seq_len=16, batch_size=8))
    with pytest.raises(DataError, match="validation split has 3 windows"):
        val_batches(np.arange(50, dtype=np.int32), DataConfig(seq_len=16, batch_size=8), 2)


def test_arrayrecord_source(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = tmp_path / "docs.arrayrecord"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for i in range(8):
        writer.write(json.dumps({"text": f"record {i} " * 30}).encode())
    writer.write(b"raw utf-8 text record")
    writer.close()
    docs = list(iter_documents(DataConfig(source=str(path))))
    assert len(docs) == 9 and docs[0][1].startswith("record 0") and docs[8][1] == "raw utf-8 text record"


def _word_files(d, n=40):
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        (d / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(["a", "bb", "ccc", "dddd"], 50)) + "\n")
    return d


def test_the_split_depends_on_names_in_the_corpus_not_where_it_lives(tmp_path):
    a, b = _word_files(tmp_path / "x" / "corpus"), _word_files(tmp_path / "y" / "deeper" / "corpus")
    sa, sb = (tokenize_corpus(DataConfig(source=str(s), val_fraction=0.25)) for s in (a, b))
    assert 0 < sa.n_docs[1] < 40  # a real hash split, not the tiny-corpus fallback
    np.testing.assert_array_equal(sa.train, sb.train)
    np.testing.assert_array_equal(sa.val, sb.val)
    names = [n for n, _ in iter_documents(DataConfig(source=str(a)))]
    assert names[0] == "corpus/doc00.txt" and [n for n, _ in iter_documents(DataConfig(source=str(a / "doc00.txt")))] == ["doc00.txt"]


def test_a_prepared_directory_splits_as_the_same_directory_read_in_memory(tmp_path):
    from qsparse_jax.cli.prepare import main as prepare_main
    from qsparse_jax.data.shards import ShardedTokens

    src = _word_files(tmp_path / "corpus")
    assert prepare_main(["--source", str(src), "--out", str(tmp_path / "p"), "--split_docs", "file",
                         "--val_fraction", "0.25"]) == 0
    mem = tokenize_corpus(DataConfig(source=str(src), val_fraction=0.25))
    np.testing.assert_array_equal(ShardedTokens(tmp_path / "p", "train")[:], mem.train)
    np.testing.assert_array_equal(ShardedTokens(tmp_path / "p", "val")[:], mem.val)


def test_invalid_utf8_read_in_memory_is_reported(tmp_path, capsys):
    src = _word_files(tmp_path / "corpus", 8)
    (src / "bad.txt").write_bytes(b"caf\xe9 \xff\n")
    splits = tokenize_corpus(DataConfig(source=str(src)))
    assert "invalid UTF-8 in 1 documents (2 bytes, first: corpus/bad.txt) read as U+FFFD" in capsys.readouterr().err
    assert splits.vocab_size == 256


def test_the_val_fraction_note_appears_only_when_the_user_set_it(tmp_path, capsys):
    from qsparse_jax.cli.prepare import main as prepare_main
    from qsparse_jax.data.pipeline import load_splits

    src = _word_files(tmp_path / "corpus")
    assert prepare_main(["--source", str(src), "--out", str(tmp_path / "p"), "--split_docs", "file",
                         "--val_fraction", "0.25"]) == 0
    capsys.readouterr()
    load_splits(DataConfig(source=str(tmp_path / "p")))  # not set: prepare's split, no note
    assert "val_fraction" not in capsys.readouterr().err
    load_splits(DataConfig(source=str(tmp_path / "p"), val_fraction=0.1))
    assert "note: data.val_fraction=0.1 does not apply" in capsys.readouterr().err
