"""Documents of a corpus, streamed: text files, JSONL (plain, ``.gz``, ``.zst``), Parquet, ArrayRecord.

Every reader yields ``(name, text)`` pairs one document at a time, so no reader ever holds a whole
file (Parquet is read a record batch at a time). ``name`` is stable across machines and runs: the
train / validation split is a hash of it (``is_validation``). The embedded corpus ``stdlib`` is the
Python standard library's own ``.py`` sources, present wherever Python is.
"""

from __future__ import annotations

import gzip
import io
import json
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".text")
ALLOWED = ".txt .md .py .rst .text, .jsonl / .jsonl.gz / .jsonl.zst, .parquet, .arrayrecord"


def is_validation(name: str, fraction: float) -> bool:
    """Stable split: a document is validation when a CRC of its name falls below the fraction."""
    return zlib.crc32(name.encode()) % 1_000_000 < fraction * 1_000_000


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
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def _open_lines(path: Path) -> io.TextIOBase:
    """A text stream over a JSONL file, decompressing ``.gz`` / ``.zst`` on the fly."""
    name = path.name.lower()
    try:
        if name.endswith(".gz"):
            return gzip.open(path, "rt", encoding="utf-8", errors="replace")
        if name.endswith((".zst", ".zstd")):
            import zstandard

            raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
            return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
        return open(path, encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def jsonl_documents(path: Path, field: str, name: str | None = None) -> Iterator[tuple[str, str]]:
    """``(f"{name}:{line}", record[field])`` for each non-blank line."""
    name = str(path) if name is None else name
    with _open_lines(path) as f:
        try:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                    raise DataError(f"{path}:{i + 1}: expected an object with a string field '{field}'")
                yield f"{name}:{i + 1}", rec[field]
        except (OSError, EOFError, ValueError) as e:  # truncated .gz / corrupt .zst
            if isinstance(e, DataError):
                raise
            raise DataError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


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
                      row_groups: tuple[int, int] | None = None) -> Iterator[tuple[str, str]]:
    """``(f"{name}#{row}", text)`` for the rows of ``row_groups`` (a half-open range; all by default),
    read one record batch at a time; null cells are skipped."""
    name = str(path) if name is None else name
    pf = parquet_column(path, field)
    lo, hi = row_groups or (0, pf.num_row_groups)
    row = sum(pf.metadata.row_group(g).num_rows for g in range(lo))
    for batch in pf.iter_batches(batch_size=1024, columns=[field], row_groups=list(range(lo, hi))):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield f"{name}#{row}", text
            row += 1


def arrayrecord_documents(path: Path, field: str, name: str | None = None) -> Iterator[tuple[str, str]]:
    """Records holding UTF-8 text, or a JSON object with ``field``."""
    import grain

    name = str(path) if name is None else name
    source = grain.sources.ArrayRecordDataSource([str(path)])
    for i in range(len(source)):
        raw = source[i]
        try:
            text = raw.decode("utf-8")
            if text.lstrip().startswith("{"):
                text = json.loads(text)[field]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path} record {i}: expected UTF-8 text or a JSON object with '{field}'") from None
        yield f"{name}#{i}", text


def read_documents(path: Path, fmt: str, field: str, name: str | None = None,
                   row_groups: tuple[int, int] | None = None) -> Iterator[tuple[str, str]]:
    """The documents of one file of format ``fmt`` (see ``file_format``), streamed."""
    if fmt == "jsonl":
        return jsonl_documents(path, field, name)
    if fmt == "parquet":
        return parquet_documents(path, field, name, row_groups)
    if fmt == "arrayrecord":
        return arrayrecord_documents(path, field, name)
    return iter([(str(path) if name is None else name, read_text(path))])


@dataclass(frozen=True)
class InputFile:
    path: Path
    name: str  # stable document-name prefix: relative to its source, so the split survives a move
    fmt: str
    size: int  # bytes on disk


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
            found = [InputFile(f, f.relative_to(root).as_posix(), "text", f.stat().st_size) for f in stdlib_files()]
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
                        found.append(InputFile(f, f"{p.name}/{f.relative_to(p).as_posix()}", fmt, f.stat().st_size))
            else:
                fmt = file_format(p)
                if fmt is None:
                    raise DataError(f"--source {src}: unknown file type (allowed: {ALLOWED})")
                found = [InputFile(p, p.name, fmt, p.stat().st_size)]
        if not found or all(f.size == 0 for f in found):
            raise DataError(f"--source {src} is empty: no non-empty files of a known type ({ALLOWED})")
        for f in found:
            if f.fmt == "parquet":
                parquet_column(f.path, text_field)
        files += found
    return files, skipped

