"""Corpora in ``qsparse prepare`` (issue 19): text files split into documents, no empty validation split,
failures that leave nothing in the way, invalid UTF-8 counted or refused, progress for logs and terminals."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from qsparse_jax.cli.prepare import main as prepare_main
from qsparse_jax.data import prepare as prep
from qsparse_jax.data.corpus import read_documents
from qsparse_jax.data.shards import ShardedTokens

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def _prepare(*args) -> int:
    return prepare_main([str(a) for a in args])


def _one_line_error(capsys, rc) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def _lines(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, 8)) for _ in range(n)]


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_a_single_text_file_is_one_document_per_line_by_default(tmp_path):
    lines = _lines(300)
    (tmp_path / "big.txt").write_text("\n".join(lines[:100]) + "\n\n\n" + "\n".join(lines[100:]) + "\n")
    out = tmp_path / "out"
    assert _prepare("--source", tmp_path / "big.txt", "--out", out) == 0
    splits = _manifest(out)["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 300  # blank lines are no documents
    assert splits["val"]["documents"] > 0
    got = bytes(np.concatenate([ShardedTokens(out, s)[:] for s in ("train", "val")]).astype(np.uint8))
    assert sorted(got.split(b"\0")[:-1]) == sorted(x.encode() for x in lines)  # each line, its line break dropped


def test_text_files_split_by_line_paragraph_or_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"one\r\ntwo\n\n  \nthree\nfour\n")
    docs = lambda split: [(n, t) for n, t, _ in read_documents(f, "text", "text", "c/a.txt", split=split)]
    assert docs("line") == [("c/a.txt:1", "one"), ("c/a.txt:2", "two"), ("c/a.txt:5", "three"), ("c/a.txt:6", "four")]
    assert docs("paragraph") == [("c/a.txt:1", "one\ntwo"), ("c/a.txt:5", "three\nfour")]
    assert docs("file") == [("c/a.txt", "one\ntwo\n\n  \nthree\nfour\n")]  # line breaks as text mode reads them


def test_an_empty_validation_split_is_a_one_line_error_that_leaves_nothing(tmp_path, capsys):
    (tmp_path / "big.txt").write_text("\n".join(_lines(200)) + "\n")
    out = tmp_path / "out"
    err = _one_line_error(capsys, _prepare("--source", tmp_path / "big.txt", "--out", out, "--split_docs", "file"))
    assert "--val_fraction 0.02 put none of the 1 document into validation" in err
    assert "--split_docs line or paragraph" in err
    assert not out.exists()
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "a single record"}) + "\n")
    empty = tmp_path / "empty"
    empty.mkdir()  # an existing directory stays, empty
    assert "put none of the 1 document" in _one_line_error(capsys, _prepare("--source", tmp_path / "one.jsonl",
                                                                            "--out", empty))
    assert empty.is_dir() and not list(empty.iterdir())


def test_a_failed_prepare_does_not_block_the_corrected_command(tmp_path, capsys):
    src = tmp_path / "data.jsonl"
    src.write_text("\n".join(json.dumps({"content": t, "id": i}) for i, t in enumerate(_lines(50))) + "\n")
    out = tmp_path / "out"
    err = _one_line_error(capsys, _prepare("--source", src, "--out", out))
    assert not out.exists()
    assert _prepare("--source", src, "--out", out, "--text_field", "content", "--val_fraction", 0.2) == 0
    assert _manifest(out)["splits"]["val"]["documents"] > 0
    assert "expected an object with a string field 'text' (its fields: content, id); set --text_field" in err


def test_a_failed_part_keeps_the_directory_and_says_what_to_do(tmp_path, capsys):
    src = tmp_path / "data.jsonl"
    src.write_text(json.dumps({"content": "x"}) + "\n")
    out = tmp_path / "out"
    err = _one_line_error(capsys, _prepare("--source", src, "--out", out, "--num_shards", 2, "--shard_index", 0))
    assert err.endswith(f"({out} keeps its finished chunks: fix the input and re-run the same command, or delete {out})")
    assert (out / "prepare.json").exists()  # the other part may be using it


def test_out_holding_other_files_is_refused(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("\n".join(_lines(100)) + "\n")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.md").write_text("keep me")
    err = _one_line_error(capsys, _prepare("--source", tmp_path / "a.txt", "--out", out))
    assert "holds other files (e.g. notes.md) and no prepare output" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.md"]


def _utf8_corpus(tmp_path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("\n".join(_lines(60)) + "\n")
    (src / "b.txt").write_bytes(b"fine line\nbad \xff line\nalso bad \xe2\x82 and \xc3\n")
    return src


def test_invalid_utf8_is_counted_and_reported(tmp_path, capsys):
    src = _utf8_corpus(tmp_path)
    out = tmp_path / "out"
    assert _prepare("--source", src, "--out", out, "--val_fraction", 0.1) == 0
    err = capsys.readouterr().err
    assert "invalid UTF-8 in 2 documents (4 bytes; first: src/b.txt:2) was read as U+FFFD" in err
    assert _manifest(out)["invalid_utf8"] == {"documents": 2, "bytes": 4, "first": "src/b.txt:2"}


def test_strict_utf8_refuses_naming_the_file_and_line(tmp_path, capsys):
    src = _utf8_corpus(tmp_path)
    out = tmp_path / "out"
    err = _one_line_error(capsys, _prepare("--source", src, "--out", out, "--strict_utf8"))
    assert f"{src / 'b.txt'}:2: invalid UTF-8 (byte 0xff) and --strict_utf8 refuses it" in err
    assert not out.exists()
    err = _one_line_error(capsys, _prepare("--source", src / "b.txt", "--out", out, "--strict_utf8",
                                           "--split_docs", "file"))
    assert f"{src / 'b.txt'}:2: invalid UTF-8" in err  # a whole file: the line is counted


def test_progress_in_a_log_is_plain_lines_on_stderr(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QSPARSE_PROGRESS_S", "0")
    monkeypatch.delenv("CI", raising=False)
    (tmp_path / "a.txt").write_text("\n".join(_lines(20000)) + "\n")  # > 1 MB of text: several batches
    assert _prepare("--source", tmp_path / "a.txt", "--out", tmp_path / "out") == 0
    got = capsys.readouterr()
    lines = [x for x in got.err.splitlines() if x.startswith("prepare: ") and "% of" in x]
    assert lines and "tokens" in lines[-1] and "left" in lines[-1]
    assert "\r" not in got.err + got.out


def test_progress_on_a_terminal_is_a_tqdm_bar(tmp_path, monkeypatch):
    bars = []

    class Bar:
        def __init__(self, **kw):
            self.kw, self.n, self.closed = kw, 0, False
            bars.append(self)

        def update(self, n):
            self.n += n

        def set_postfix_str(self, s, refresh=True):
            self.postfix = s

        def close(self):
            self.closed = True

    monkeypatch.setattr(prep, "tqdm", Bar)
    monkeypatch.setattr(prep, "interactive", lambda: True)
    (tmp_path / "a.txt").write_text("\n".join(_lines(500)) + "\n")
    assert _prepare("--source", tmp_path / "a.txt", "--out", tmp_path / "out") == 0
    (bar,) = bars
    assert bar.kw["file"] is sys.stderr and bar.kw["unit"] == "B" and bar.closed
    assert bar.n == bar.kw["total"] == (tmp_path / "a.txt").stat().st_size and "tokens" in bar.postfix


def test_a_different_prepare_in_out_says_to_delete_it(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("\n".join(_lines(200)) + "\n")
    out = tmp_path / "out"
    assert _prepare("--source", tmp_path / "a.txt", "--out", out) == 0
    capsys.readouterr()
    err = _one_line_error(capsys, _prepare("--source", tmp_path / "a.txt", "--out", out, "--split_docs", "paragraph"))
    assert "prepared with other arguments or inputs (split_docs differ; complete)" in err
    assert f"delete {out} or choose another --out" in err


@pytest.mark.parametrize("split", ["line", "paragraph"])
def test_split_docs_with_only_records_says_it_does_not_apply(tmp_path, capsys, split):
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in _lines(100)) + "\n")
    assert _prepare("--source", tmp_path / "r.jsonl", "--out", tmp_path / "out", "--split_docs", split,
                    "--val_fraction", 0.2) == 0
    assert f"note: --split_docs {split} applies to plain text files; the sources have none" in capsys.readouterr().err
