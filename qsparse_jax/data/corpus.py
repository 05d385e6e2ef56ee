"""Documents of a corpus, streamed: text files, JSONL (plain, ``.gz``, ``.zst``), Parquet, ArrayRecord.

Every reader yields ``(name, text, replaced)`` one document at a time (Parquet a record batch at a
time, text files and JSONL a line at a time; only ``split="file"`` reads a text file whole).
``name`` is stable across machines and runs and independent of where the corpus lives: it is the
file's path relative to its source (``document_name``: ``corpus/sub/a.txt`` for a directory source
``.../corpus``, ``a.txt`` for a file), plus ``:LINE`` for a line or paragraph of a text file or a
JSONL record, ``#ROW`` for a Parquet row or ArrayRecord record. The train / validation split is a
hash of it (``is_validation``), so moving the corpus does not change the split, and a prepared
corpus and the same corpus read in memory split alike.

Plain text files become documents by ``split`` (``SPLIT_MODES``): ``file`` (the whole file),
``line`` (each non-blank line, its line break dropped, as HF ``datasets``' ``text`` loader
yields them) or ``paragraph`` (runs of non-blank lines separated by blank lines). Records of JSONL,
Parquet and ArrayRecord files are documents as they are.

Invalid UTF-8 becomes U+FFFD (as Python's ``errors="replace"``); ``replaced`` counts the invalid
bytes of each document, so a caller can report them, and ``strict=True`` refuses them instead (a
one-line ``DataError`` naming the file and line). The embedded corpus ``stdlib`` is the Python
standard library's own ``.py`` sources, present wherever Python is.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import os
import sysconfig
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from ..errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".text")
ALLOWED = ".txt .md .py .rst .text, .jsonl / .jsonl.gz / .jsonl.zst, .parquet, .arrayrecord"
SPLIT_MODES = ("line", "paragraph", "file")


VAL_FRACTION = 0.02  # data.val_fraction when unset (a prepared corpus keeps prepare's own split)


def is_validation(name: str, fraction: float) -> bool:
    """Stable split: a document is validation when a CRC of its name falls below the fraction."""
    return zlib.crc32(name.encode()) % 1_000_000 < fraction * 1_000_000


def document_name(source: Path, f: Path) -> str:
    """The name prefix of the documents of file ``f`` of ``source`` (a directory, or ``f`` itself):
    ``DIRNAME/relative/path`` or the file's name; never where the source lives."""
    root = Path(os.path.abspath(source))
    if f == source or not source.is_dir():
        return root.name
    return f"{root.name}/{f.relative_to(source).as_posix()}"


# --- UTF-8 -----------------------------------------------------------------------------------------

_COUNT = threading.local()
NEWLINE = b"\n"


def _count_and_replace(e: UnicodeDecodeError):
    _COUNT.n = getattr(_COUNT, "n", 0) + e.end - e.start
    return "\ufffd", e.end


codecs.register_error("qsparse_jax.count_replace", _count_and_replace)


def decode_utf8(raw: bytes, where: str, strict: bool = False, whole_file: bool = False) -> tuple[str, int]:
    """``(text, invalid bytes replaced by U+FFFD)``; with ``strict`` a one-line ``DataError`` at the
    first invalid byte instead (``where``: the file and line, or for ``whole_file`` the file, whose
    line is then counted)."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError as e:
        if strict:
            at = f"{where}:{raw.count(NEWLINE, 0, e.start) + 1}" if whole_file else where
            raise DataError(f"{at}: invalid UTF-8 (byte 0x{raw[e.start]:02x}) and --strict_utf8 refuses it: fix or "
                            f"remove the file, or leave out --strict_utf8 (invalid bytes then become U+FFFD "
                            f"and are counted)") from None
    before = getattr(_COUNT, "n", 0)
    text = raw.decode("utf-8", "qsparse_jax.count_replace")
    return text, _COUNT.n - before


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files (site-packages excluded), sorted by relative path."""
    root = stdlib_root()
    files = [f for f in root.rglob("*.py") if "site-packages" not in f.parts and "dist-packages" not in f.parts]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def file_format(path: Path) -> str | None:
    """text | jsonl | parquet | arrayrecord from the file name, or None for an unknown type."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".arrayrecord", ".array_record")) or ".array_record-" in name:
        return "arrayrecord"
    if path.suffix.lower() in TEXT_SUFFIXES:
        return "text"
    return None


def read_text(path: Path) -> str:
    """A whole text file, invalid UTF-8 replaced (``text_documents`` counts what it replaces)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def _open_binary(path: Path) -> BinaryIO:
    """A byte stream over a (JSONL or text) file, decompressing ``.gz`` / ``.zst`` on the fly."""
    name = path.name.lower()
    try:
        if name.endswith(".gz"):
            return gzip.open(path, "rb")
        if name.endswith((".zst", ".zstd")):
            import zstandard

            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def _read_error(path: Path, e: Exception) -> DataError:
    return DataError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def text_documents(path: Path, name: str | None = None, split: str = "file",
                   strict: bool = False) -> Iterator[tuple[str, str, int]]:
    """The documents of a plain text file by ``split`` (see the module docstring): ``file`` → one
    ``(name, text)`` with line breaks normalized to ``\\n`` (as Python's text mode reads them);
    ``line`` → ``(f"{name}:{line}", line)`` per non-blank line; ``paragraph`` →
    ``(f"{name}:{first line}", lines joined by \\n)`` per run of non-blank lines."""
    name = str(path) if name is None else name
    if split == "file":
        text, bad = decode_utf8(_read_bytes(path), str(path), strict, whole_file=True)
        yield name, text.replace("\r\n", "\n").replace("\r", "\n"), bad
        return
    para: list[str] = []
    start = bad_para = 0
    with _open_binary(path) as f:
        try:
            for i, raw in enumerate(f, 1):
                line, bad = decode_utf8(raw, f"{path}:{i}", strict)
                line = line.rstrip("\r\n")
                if split == "line":
                    if line.strip():
                        yield f"{name}:{i}", line, bad
                elif line.strip():
                    start = start if para else i
                    para.append(line)
                    bad_para += bad
                elif para:
                    yield f"{name}:{start}", "\n".join(para), bad_para
                    para, bad_para = [], 0
        except OSError as e:
            raise _read_error(path, e) from None
    if para:
        yield f"{name}:{start}", "\n".join(para), bad_para


def jsonl_documents(path: Path, field: str, name: str | None = None,
                    strict: bool = False) -> Iterator[tuple[str, str, int]]:
    """``(f"{name}:{line}", record[field], replaced)`` for each non-blank line."""
    name = str(path) if name is None else name
    with _open_binary(path) as f:
        try:
            for i, raw in enumerate(f, 1):
                line, bad = decode_utf8(raw, f"{path}:{i}", strict)
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                    has = (f" (its fields: {', '.join(list(rec)[:8])})" if isinstance(rec, dict) and rec else "")
                    raise DataError(f"{path}:{i}: expected an object with a string field '{field}'{has}; "
                                    f"set --text_field / data.text_field")
                yield f"{name}:{i}", rec[field], bad
        except (OSError, EOFError, ValueError) as e:  # truncated .gz / corrupt .zst
            if isinstance(e, DataError):
                raise
            raise _read_error(path, e) from None


def parquet_column(path: Path, field: str):
    """The ParquetFile, after checking it has a string column ``field`` (one-line errors)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read Parquet file {path}: {str(e).splitlines()[0]}") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        raise DataError(f"{path}: no column '{field}' (columns: {', '.join(schema.names)}); set --text_field / data.text_field")
    tp = schema.field(field).type
    if not (pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_string_view(tp)):
        raise DataError(f"{path}: column '{field}' holds {tp}, not text; set --text_field / data.text_field")
    return pf


def parquet_documents(path: Path, field: str, name: str | None = None,
                      row_groups: tuple[int, int] | None = None) -> Iterator[tuple[str, str, int]]:
    """``(f"{name}#{row}", text, 0)`` for the rows of ``row_groups`` (a half-open range; all by default),
    read one record batch at a time; null cells are skipped (Arrow strings are valid UTF-8)."""
    name = str(path) if name is None else name
    pf = parquet_column(path, field)
    lo, hi = row_groups or (0, pf.num_row_groups)
    row = sum(pf.metadata.row_group(g).num_rows for g in range(lo))
    for batch in pf.iter_batches(batch_size=1024, columns=[field], row_groups=list(range(lo, hi))):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield f"{name}#{row}", text, 0
            row += 1


def arrayrecord_documents(path: Path, field: str, name: str | None = None,
                          strict: bool = False) -> Iterator[tuple[str, str, int]]:
    """Records holding UTF-8 text, or a JSON object with ``field``."""
    import grain

    name = str(path) if name is None else name
    source = grain.sources.ArrayRecordDataSource([str(path)])
    for i in range(len(source)):
        text, bad = decode_utf8(source[i], f"{path} record {i}", strict)
        try:
            if text.lstrip().startswith("{"):
                text = json.loads(text)[field]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path} record {i}: expected UTF-8 text or a JSON object with '{field}'") from None
        yield f"{name}#{i}", text, bad


def read_documents(path: Path, fmt: str, field: str, name: str | None = None,
                   row_groups: tuple[int, int] | None = None, split: str = "file",
                   strict: bool = False) -> Iterator[tuple[str, str, int]]:
    """``(name, text, invalid UTF-8 bytes replaced)`` for the documents of one file of format ``fmt``
    (see ``file_format``), streamed; ``split`` applies to plain text files only."""
    if fmt == "jsonl":
        return jsonl_documents(path, field, name, strict)
    if fmt == "parquet":
        return parquet_documents(path, field, name, row_groups)
    if fmt == "arrayrecord":
        return arrayrecord_documents(path, field, name, strict)
    return text_documents(path, name, split, strict)


@dataclass(frozen=True)
class InputFile:
    path: Path
    name: str  # stable document-name prefix: relative to its source, so the split survives a move
    fmt: str
    size: int  # bytes on disk
    source: str = ""  # the --source it came from


def list_inputs(sources: list[str], text_field: str = "text") -> tuple[list[InputFile], list[Path]]:
    """Every input file of ``sources`` in a fixed order, and the files skipped in directories for an
    unknown type. A named file of unknown type, a missing path, an empty source or a Parquet file
    without the text column is a one-line ``DataError``."""
    files: list[InputFile] = []
    skipped: list[Path] = []
    for src in sources:
        found: list[InputFile] = []
        if src == "stdlib":
            root = stdlib_root()
            found = [InputFile(f, f.relative_to(root).as_posix(), "text", f.stat().st_size, src)
                     for f in stdlib_files()]
        else:
            p = Path(src)
            if not p.exists():
                raise DataError(f"--source {src}: no such file or directory")
            if p.is_dir():
                for f in sorted(q for q in p.rglob("*") if q.is_file()):
                    fmt = file_format(f)
                    if fmt is None:
                        skipped.append(f)
                    else:
                        found.append(InputFile(f, document_name(p, f), fmt, f.stat().st_size, src))
            else:
                fmt = file_format(p)
                if fmt is None:
                    raise DataError(f"--source {src}: unknown file type (allowed: {ALLOWED})")
                found = [InputFile(p, document_name(p, p), fmt, p.stat().st_size, src)]
        if not found or all(f.size == 0 for f in found):
            raise DataError(f"--source {src} is empty: no non-empty files of a known type ({ALLOWED})")
        for f in found:
            if f.fmt == "parquet":
                parquet_column(f.path, text_field)
        files += found
    return files, skipped
