"""Prepare a corpus once: stream documents, tokenize in worker processes, write memory-mappable shards.

``qsparse prepare --source SRC [SRC ...] --tokenizer byte|PATH/tokenizer.json --out DIR
[--workers N] [--shard_index I --num_shards N] [--val_fraction F] [--text_field F]
[--split_docs line|paragraph|file] [--strict_utf8]``

Training then reads ``data.source=DIR`` without tokenizing anything (``shards.py``), the way
Megatron / nanoGPT read pre-tokenized binaries and levanter its cache. Layout of ``DIR``:

- ``prepare.json``: the arguments and a fingerprint of the input plan; a re-run or another part
  must match it (else a one-line error), so parts of one dataset never mix inputs.
- ``train/cNNNNNN-KKKK.bin``, ``val/...``: token shards, little-endian uint16 (vocabulary ≤ 65,536)
  or uint32, at most ``--shard_tokens`` tokens each. Documents are joined with the tokenizer's
  separator token, which follows every document (as ``data.tokenize_corpus`` does in memory).
- ``chunks/cNNNNNN.json``: written when chunk N is complete (after its shards were renamed into
  place), so a killed prepare re-run with the same arguments skips finished chunks and rewrites the
  others; every file's bytes are a pure function of the inputs and arguments, so the result is
  byte-identical however often it was interrupted, and whatever ``--workers`` was.
- ``manifest.json``: written when every chunk is complete; what training reads.

Work is divided into *chunks*: consecutive input files adding up to ``--chunk_mb`` on disk (a
Parquet file larger than that is split by row groups). Chunk ``c`` belongs to part
``c mod --num_shards``, so N machines or processes prepare disjoint parts into one directory (a
shared file system, or copy the parts together and run ``--merge``); the part that finishes last
writes the manifest. Shards are named by chunk, so one process and N parts write the same files.

Documents (``corpus.py``): a record of a JSONL / Parquet / ArrayRecord file is one; a plain text file
is split by ``--split_docs``, by default into ``line``s, as HF ``datasets``' ``text`` loader does (its
``sample_by="line"`` default: what a user of a big ``.txt`` expects, and the only choice that gives a
single file a validation split); ``paragraph`` splits at blank lines, ``file`` keeps each file whole
(code, Markdown). The embedded ``stdlib`` corpus stays one document per module unless
``--split_docs`` is given, as ``data.source=stdlib`` reads it in memory.

A prepare never ends "complete" with an empty split: with ``--val_fraction`` > 0 and no validation
document (or no training one) it is a one-line error saying what to change, and the shards are removed.
A prepare that fails on its input (bad JSONL, a missing ``--text_field``, ``--strict_utf8``) removes
what it wrote when it started the directory alone (one part), so the corrected command runs; a
directory holding another prepare is refused with a line saying to delete it or choose another
``--out``. Invalid UTF-8 is read as U+FFFD, counted (documents, bytes, the first document) in the
summary and the manifest (``invalid_utf8``), or refused by ``--strict_utf8``. Progress: a tqdm bar
when stderr is a terminal, else a plain line on stderr every 10 s (``QSPARSE_PROGRESS_S``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tqdm import tqdm

from ..errors import DataError
from ..progress import duration, interactive, interval
from .corpus import SPLIT_MODES, InputFile, is_validation, list_inputs, read_documents
from .shards import FORMAT, PREPARE_VERSION
from .tokenizer import make_tokenizer

OWN = {"train", "val", "chunks", "prepare.json", "manifest.json", "tokenizer.json"}  # what prepare writes in --out


@dataclass(frozen=True)
class Piece:
    file: InputFile
    row_groups: tuple[int, int] | None = None  # Parquet: a half-open range of row groups
    size: int | None = None  # bytes on disk, when a part of the file

    @property
    def disk(self) -> int:
        return self.file.size if self.size is None else self.size


def plan_chunks(files: list[InputFile], chunk_bytes: int) -> list[list[Piece]]:
    """Consecutive files grouped into chunks of about ``chunk_bytes`` on disk (from file sizes and
    Parquet metadata only: every part computes the same plan without reading any text)."""
    chunks: list[list[Piece]] = []
    cur: list[Piece] = []
    size = 0
    for f in files:
        if f.fmt == "parquet" and f.size > chunk_bytes:
            import pyarrow.parquet as pq

            if cur:
                chunks.append(cur)
                cur, size = [], 0
            md = pq.ParquetFile(f.path).metadata
            per_group = [md.row_group(g).total_byte_size for g in range(md.num_row_groups)]
            scale = f.size / max(sum(per_group), 1)  # on-disk bytes per uncompressed byte
            lo, acc = 0, 0.0
            for g, b in enumerate(per_group):
                acc += b * scale
                if acc >= chunk_bytes or g == len(per_group) - 1:
                    chunks.append([Piece(f, (lo, g + 1), int(acc))])
                    lo, acc = g + 1, 0.0
            continue
        cur.append(Piece(f))
        size += f.size
        if size >= chunk_bytes:
            chunks.append(cur)
            cur, size = [], 0
    if cur:
        chunks.append(cur)
    return chunks


def _pieces_record(chunks: list[list[Piece]]) -> list:
    return [[[p.file.name, p.file.fmt, p.file.size, list(p.row_groups) if p.row_groups else None] for p in c]
            for c in chunks]


_TOKENIZER = None


def _init_worker(spec: str, dtype: str, single_threaded: bool):
    global _TOKENIZER
    if single_threaded:  # N processes each with all-core rayon threads would oversubscribe the cores
        os.environ["RAYON_NUM_THREADS"] = "1"
    _TOKENIZER = (make_tokenizer(spec), np.dtype(dtype))


def _encode(job):
    """(chunk, flags, texts, end, bad) → (chunk, flags, token arrays with the separator appended, end,
    text bytes, bad): ``bad`` (invalid UTF-8 of the batch) passes through."""
    cid, flags, texts, end, bad = job
    tok, dtype = _TOKENIZER
    sep = np.asarray([tok.separator], dtype)
    arrays = [np.concatenate([ids.astype(dtype), sep]) for ids in tok.encode_batch(texts)]
    return cid, flags, arrays, end, sum(len(t.encode("utf-8", errors="replace")) for t in texts), bad


def _jobs(todo: list[tuple[int, list[Piece]]], a: "PrepareArgs", batch_bytes: int = 1 << 20):
    """Batches of about ``batch_bytes`` of text, in document order; the last of a chunk has end=True.
    Each carries ``bad = [documents, bytes, first document]`` of the invalid UTF-8 it replaced."""
    for cid, pieces in todo:
        flags, texts, size, bad = [], [], 0, [0, 0, None]
        for p in pieces:
            for name, text, nbad in read_documents(p.file.path, p.file.fmt, a.text_field, p.file.name, p.row_groups,
                                                   a.split_for(p.file.source), a.strict_utf8):
                if nbad:
                    bad = [bad[0] + 1, bad[1] + nbad, bad[2] or name]
                if not text:
                    continue
                flags.append(is_validation(name, a.val_fraction))
                texts.append(text)
                size += len(text)
                if size >= batch_bytes:
                    yield cid, flags, texts, False, bad
                    flags, texts, size, bad = [], [], 0, [0, 0, None]
        yield cid, flags, texts, True, bad


def _write_atomic(path: Path, data: bytes):
    """Write to a temporary name, flush to disk, rename: a reader never sees a partial file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj):
    _write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


class ShardWriter:
    """One split of one chunk: documents appended in order, cut into shards of ``shard_tokens``."""

    def __init__(self, out: Path, split: str, cid: int, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.cid, self.dtype, self.shard_tokens = out, split, cid, dtype, shard_tokens
        self.buf: list[np.ndarray] = []
        self.ends: deque[int] = deque()  # token offsets (in buf) where documents end
        self.n = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray):
        self.buf.append(tokens)
        self.n += len(tokens)
        self.ends.append(self.n)
        while self.n >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> list[dict]:
        if self.n:
            self._flush(self.n)
        return self.shards

    def _flush(self, count: int):
        flat = np.concatenate(self.buf) if len(self.buf) > 1 else self.buf[0]
        rel = f"{self.split}/c{self.cid:06d}-{len(self.shards):04d}.bin"
        _write_atomic(self.out / rel, np.ascontiguousarray(flat[:count], self.dtype.newbyteorder("<")).tobytes())
        docs = 0
        while self.ends and self.ends[0] <= count:
            self.ends.popleft()
            docs += 1
        self.ends = deque(e - count for e in self.ends)
        rest = flat[count:]
        self.buf, self.n = ([rest] if len(rest) else []), len(rest)
        self.shards.append({"file": rel, "tokens": int(count), "documents": docs})


class _Meter:
    """Progress (``qsparse_jax.progress``'s rules): a tqdm bar of input bytes on a terminal, else a plain
    line on stderr every ``progress.interval()`` seconds (no carriage returns; a short prepare prints only
    its summary), with MB/s of text, tokens/s and the time left from the input bytes done."""

    def __init__(self, total_bytes: int):
        self.total, self.t0 = total_bytes, time.time()
        self.last, self.every = self.t0, interval()
        self.text_bytes = self.tokens = 0
        self.bar = tqdm(total=total_bytes, desc="prepare", unit="B", unit_scale=True, file=sys.stderr,
                        dynamic_ncols=True) if interactive() else None

    def update(self, text_bytes: int, tokens: int, done_bytes: int):
        """Add a batch's text bytes and tokens; ``done_bytes``: input bytes done so far (an estimate)."""
        self.text_bytes += text_bytes
        self.tokens += tokens
        now = time.time()
        el = max(now - self.t0, 1e-9)
        done = min(done_bytes, self.total)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.tokens:,} tokens, {self.tokens / el:,.0f} tok/s", refresh=False)
            self.bar.update(done - self.bar.n)
            return
        if now - self.last < self.every:
            return
        self.last = now
        frac = done / max(self.total, 1)
        left = el * (1 - frac) / frac if frac > 0 else float("nan")
        print(f"prepare: {100 * frac:.1f}% of {self.total / 1e6:,.1f} MB, {self.text_bytes / 1e6 / el:,.1f} MB/s, "
              f"{self.tokens:,} tokens ({self.tokens / el:,.0f}/s), {duration(now - self.t0)}, ~{duration(left)} left",
              file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


@dataclass
class PrepareArgs:
    sources: list[str]
    tokenizer: str
    out: str
    workers: int = 1
    shard_index: int = 0
    num_shards: int = 1
    val_fraction: float = 0.02
    text_field: str = "text"
    shard_tokens: int = 1 << 26  # 64 Mi tokens: 128 MiB as uint16
    chunk_mb: float = 256.0
    split_docs: str | None = None  # line | paragraph | file; None: line (stdlib: file)
    strict_utf8: bool = False

    def check(self):
        if not self.sources:
            raise DataError("--source: name at least one corpus (stdlib, a file or a directory)")
        if self.workers < 1:
            raise DataError(f"--workers must be >= 1, got {self.workers}")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise DataError(f"--shard_index must be in [0, --num_shards={self.num_shards}), got {self.shard_index}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_tokens < 1:
            raise DataError(f"--shard_tokens must be >= 1, got {self.shard_tokens}")
        if not self.chunk_mb > 0:
            raise DataError(f"--chunk_mb must be positive, got {self.chunk_mb}")
        if self.split_docs is not None and self.split_docs not in SPLIT_MODES:
            raise DataError(f"--split_docs must be one of {', '.join(SPLIT_MODES)}, got {self.split_docs!r}")

    def split_for(self, source: str) -> str:
        """How the plain text files of ``source`` become documents."""
        return self.split_docs or ("file" if source == "stdlib" else "line")


def _settings(a: PrepareArgs, tok, dtype: np.dtype, chunks) -> dict:
    """What must agree between every run and part writing one directory."""
    plan = hashlib.sha256(json.dumps(_pieces_record(chunks)).encode()).hexdigest()
    return {"format": FORMAT, "prepare_version": PREPARE_VERSION, "sources": list(a.sources),
            "tokenizer": {"spec": "byte" if a.tokenizer == "byte" else Path(a.tokenizer).name,
                          "fingerprint": tok.fingerprint(), "vocab_size": int(tok.vocab_size),
                          "separator": int(tok.separator)},
            "dtype": dtype.name, "val_fraction": a.val_fraction, "text_field": a.text_field,
            "split_docs": [a.split_for(s) for s in a.sources], "strict_utf8": a.strict_utf8,
            "shard_tokens": a.shard_tokens, "chunk_mb": a.chunk_mb, "chunks": len(chunks), "input_plan": plan}


def _check_out(out: Path):
    """``--out`` is new, empty, or a prepare output (never a directory of other files, which a failed
    prepare could not clean up after)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; name a new or empty directory")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if p.name not in OWN and not p.name.endswith(".tmp"))
        if other and not (out / "prepare.json").exists():
            raise DataError(f"--out {out} holds other files (e.g. {other[0]}) and no prepare output; "
                            f"name a new or empty directory")


def _claim(out: Path, settings: dict) -> bool:
    """Record the settings (True), or check that an earlier run / another part used the same ones (False)."""
    path = out / "prepare.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            raise DataError(f"--out {out}: its prepare.json is unreadable; delete {out} or choose another --out") from None
        diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        if diff:
            what = "the input files changed" if diff == ["input_plan"] else f"{', '.join(diff)} differ"
            finished = "complete" if (out / "manifest.json").exists() else "unfinished"
            raise DataError(f"--out {out} was prepared with other arguments or inputs ({what}; {finished}): delete "
                            f"{out} or choose another --out (the same arguments continue an unfinished one)")
        return False
    try:  # parts racing to create it write the same bytes
        _write_json(path, settings)
    except FileNotFoundError:
        pass
    return True


def _remove_output(out: Path, made_dir: bool):
    """Remove what prepare writes in ``out`` (and ``out`` itself when this run made it)."""
    for name in OWN:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    for p in out.glob("*.tmp"):
        p.unlink(missing_ok=True)
    if made_dir:
        try:
            out.rmdir()
        except OSError:
            pass


def _check_splits(settings: dict, splits: dict):
    """One line when the prepared corpus could not train: no text, or an empty split that was asked for."""
    tr, va = splits["train"]["documents"], splits["val"]["documents"]
    n, vf = tr + va, settings["val_fraction"]
    docs = f"{n:,} document" + ("s" if n != 1 else "")
    if splits["train"]["tokens"] + splits["val"]["tokens"] == 0:
        raise DataError(f"the sources {' '.join(settings['sources'])} hold no text")
    more = ("split the text files into more documents (--split_docs line or paragraph) or add documents"
            if "file" in settings.get("split_docs", ["file"]) else "add documents")
    if va == 0 and vf > 0:
        raise DataError(f"--val_fraction {vf} put none of the {docs} into validation (each is chosen by a "
                        f"hash of its name, about {vf * n:.2g} expected): {more}, or raise --val_fraction")
    if tr == 0:
        raise DataError(f"--val_fraction {vf} put all {docs} into validation: {more}, or lower --val_fraction")


def merge(out: Path) -> dict | None:
    """Write ``manifest.json`` from the finished chunks; None while some chunk is unfinished; a one-line
    ``DataError`` (nothing written) when the corpus has no text or an empty split (``_check_splits``)."""
    try:
        settings = json.loads((out / "prepare.json").read_text())
        records = []
        for c in range(settings["chunks"]):
            p = out / "chunks" / f"c{c:06d}.json"
            if not p.exists():
                return None
            records.append(json.loads(p.read_text()))
    except FileNotFoundError:  # another part found the finished corpus unusable and removed it
        raise DataError(f"{out}: the prepare output was removed while merging (see the other parts' errors)") from None
    splits = {}
    for split in ("train", "val"):
        shards = [s for r in records for s in r[split]]
        splits[split] = {"tokens": sum(s["tokens"] for s in shards), "documents": sum(s["documents"] for s in shards),
                         "shards": shards}
    bad = [r.get("invalid_utf8", {}) for r in records]
    invalid = {"documents": sum(b.get("documents", 0) for b in bad), "bytes": sum(b.get("bytes", 0) for b in bad),
               "first": next((b["first"] for b in bad if b.get("first")), None)}
    _check_splits(settings, splits)
    manifest = {**settings, "text_bytes": sum(r["text_bytes"] for r in records), "invalid_utf8": invalid,
                "splits": splits}
    _write_json(out / "manifest.json", manifest)
    return manifest


class _Unusable(DataError):
    """Raised by ``_run`` when ``merge`` refused the finished corpus."""


def _utf8_note(bad: dict) -> str:
    return (f"note: invalid UTF-8 in {bad['documents']:,} documents ({bad['bytes']:,} bytes; first: {bad['first']}) "
            f"was read as U+FFFD; --strict_utf8 refuses such input")


def prepare(a: PrepareArgs) -> dict:
    """Prepare this part; returns a summary (and the manifest once every part is done)."""
    a.check()
    tok = make_tokenizer(a.tokenizer)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    files, skipped = list_inputs(a.sources, a.text_field)
    chunks = plan_chunks(files, int(a.chunk_mb * 1e6))
    out = Path(a.out)
    _check_out(out)
    made_dir = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    for d in ("train", "val", "chunks"):
        (out / d).mkdir(exist_ok=True)
    try:
        owner = _claim(out, _settings(a, tok, dtype, chunks))
    except DataError:
        if made_dir:
            _remove_output(out, made_dir)
        raise
    if a.split_docs is not None and not any(f.fmt == "text" for f in files):
        print(f"note: --split_docs {a.split_docs} applies to plain text files; the sources have none (records of "
              f"JSONL / Parquet / ArrayRecord files are documents as they are)", file=sys.stderr, flush=True)
    try:
        return _run(a, out, tok, dtype, files, skipped, chunks)
    except _Unusable as e:  # every chunk is done and the result cannot train: it helps no one
        _remove_output(out, made_dir)
        raise DataError(f"{e}; nothing was written" if made_dir else f"{e}; the shards written to {out} were removed") from None
    except DataError as e:
        if owner and a.num_shards == 1:  # this run started the directory alone: leave nothing behind
            _remove_output(out, made_dir)
            raise
        raise DataError(f"{e} ({out} keeps its finished chunks: fix the input and re-run the same command, "
                        f"or delete {out})") from None


def _run(a: PrepareArgs, out: Path, tok, dtype, files, skipped, chunks) -> dict:
    t0 = time.time()
    if a.tokenizer != "byte" and not (out / "tokenizer.json").exists():
        shutil.copyfile(a.tokenizer, out / "tokenizer.json.tmp")  # the dataset names its own tokenizer
        os.replace(out / "tokenizer.json.tmp", out / "tokenizer.json")
    mine = [(c, p) for c, p in enumerate(chunks) if c % a.num_shards == a.shard_index]
    todo = [(c, p) for c, p in mine if not (out / "chunks" / f"c{c:06d}.json").exists()]
    part = f" part {a.shard_index}/{a.num_shards}:" if a.num_shards > 1 else ""
    print(f"prepare:{part} {len(files)} files ({sum(f.size for f in files) / 1e6:,.1f} MB) in {len(chunks)} chunks; "
          f"{len(mine)} chunks here, {len(mine) - len(todo)} already done"
          + (f"; skipped {len(skipped)} files of unknown type (e.g. {skipped[0]})" if skipped else ""), flush=True)
    disk = {c: sum(pc.disk for pc in ps) for c, ps in todo}
    meter = _Meter(sum(disk.values()))
    writers: dict[int, dict[bool, ShardWriter]] = {}
    stats = {"documents": 0, "text_bytes": 0, "done": 0}
    per_chunk_bytes: dict[int, int] = {}
    invalid: dict[int, list] = {}
    total_bad = {"documents": 0, "bytes": 0, "first": None}

    def handle(result):
        cid, flags, arrays, end, nbytes, bad = result
        w = writers.setdefault(cid, {v: ShardWriter(out, "val" if v else "train", cid, dtype, a.shard_tokens)
                                     for v in (False, True)})
        for is_val, t in zip(flags, arrays):
            w[is_val].add(t)
        stats["documents"] += len(arrays)
        stats["text_bytes"] += nbytes
        per_chunk_bytes[cid] = per_chunk_bytes.get(cid, 0) + nbytes
        b = invalid.setdefault(cid, [0, 0, None])
        invalid[cid] = [b[0] + bad[0], b[1] + bad[1], b[2] or bad[2]]
        if end:
            docs, nbad, first = invalid.pop(cid)
            record = {"chunk": cid, "train": w[False].close(), "val": w[True].close(),
                      "text_bytes": per_chunk_bytes.pop(cid),
                      "invalid_utf8": {"documents": docs, "bytes": nbad, "first": first}}
            _write_json(out / "chunks" / f"c{cid:06d}.json", record)
            del writers[cid]
            stats["done"] += disk[cid]
            total_bad.update(documents=total_bad["documents"] + docs, bytes=total_bad["bytes"] + nbad,
                             first=total_bad["first"] or first)
        partial = sum(min(n, disk[c]) for c, n in per_chunk_bytes.items())  # text read so far of open chunks
        meter.update(nbytes, sum(len(t) for t in arrays), stats["done"] + partial)

    jobs = _jobs(todo, a)
    try:
        if a.workers == 1:
            _init_worker(a.tokenizer, dtype.name, False)
            for job in jobs:
                handle(_encode(job))
        else:
            import multiprocessing as mp

            # spawn: the parent may hold threads (tokenizers' rayon pool) that fork would copy mid-flight
            with mp.get_context("spawn").Pool(a.workers, _init_worker, (a.tokenizer, dtype.name, True)) as pool:
                pending: deque = deque()
                for job in jobs:  # bounded read-ahead: never more than 2 batches per worker in flight
                    pending.append(pool.apply_async(_encode, (job,)))
                    if len(pending) >= 2 * a.workers:
                        handle(pending.popleft().get())
                while pending:
                    handle(pending.popleft().get())
    finally:
        meter.close()
    try:
        manifest = merge(out)
    except DataError as e:
        raise _Unusable(str(e)) from None
    el = time.time() - t0
    summary = {"documents": stats["documents"], "text_bytes": stats["text_bytes"], "tokens": meter.tokens,
               "seconds": el, "mb_per_s": stats["text_bytes"] / 1e6 / max(el, 1e-9),
               "tokens_per_s": meter.tokens / max(el, 1e-9), "complete": manifest is not None,
               "invalid_utf8": manifest["invalid_utf8"] if manifest else total_bad}
    print(f"prepare:{part} {stats['documents']:,} documents, {stats['text_bytes'] / 1e6:,.1f} MB of text -> "
          f"{meter.tokens:,} tokens in {el:.1f} s ({summary['mb_per_s']:.1f} MB/s, {summary['tokens_per_s']:,.0f} tok/s)",
          flush=True)
    if summary["invalid_utf8"]["documents"]:
        print(_utf8_note(summary["invalid_utf8"]), file=sys.stderr, flush=True)
    if manifest is not None:
        tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
        print(f"prepare: {out} complete: train {tr['tokens']:,} tokens / {tr['documents']:,} documents in "
              f"{len(tr['shards'])} shards, validation {va['tokens']:,} tokens / {va['documents']:,} documents "
              f"({manifest['dtype']}); train with data.source={out}", flush=True)
    else:
        print(f"prepare:{part} done; {out} is complete when every part has finished (the last one writes "
              f"manifest.json, or run --merge after copying the parts together)", flush=True)
    return {**summary, "manifest": manifest}


def merge_parts(out: str | Path) -> Path:
    """``qsparse prepare --merge``: write ``OUT/manifest.json`` from the finished parts in ``out``;
    a one-line ``DataError`` when ``out`` is no prepare output or a part is unfinished."""
    out = Path(out)
    if not (out / "prepare.json").exists():
        raise DataError(f"--merge: {out} holds no prepare.json (not a prepare output directory)")
    if merge(out) is None:
        done = len(list((out / "chunks").glob("c*.json")))
        n = json.loads((out / "prepare.json").read_text())["chunks"]
        raise DataError(f"--merge: {out} has {done} of {n} chunks; finish every part first")
    return out / "manifest.json"
