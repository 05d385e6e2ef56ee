"""Prepare a corpus once: stream documents, tokenize in worker processes, write memory-mappable shards.

``qsparse prepare --source SRC [SRC ...] --tokenizer byte|PATH/tokenizer.json --out DIR
[--workers N] [--shard_index I --num_shards N] [--val_fraction F] [--text_field F]``

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

from ..errors import DataError
from .corpus import InputFile, is_validation, list_inputs, read_documents
from .shards import FORMAT, PREPARE_VERSION
from .tokenizer import make_tokenizer


@dataclass(frozen=True)
class Piece:
    file: InputFile
    row_groups: tuple[int, int] | None = None  # Parquet: a half-open range of row groups


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
                    chunks.append([Piece(f, (lo, g + 1))])
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
    """(chunk, flags, texts, end) → (chunk, flags, token arrays with the separator appended, end, bytes)."""
    cid, flags, texts, end = job
    tok, dtype = _TOKENIZER
    sep = np.asarray([tok.separator], dtype)
    arrays = [np.concatenate([ids.astype(dtype), sep]) for ids in tok.encode_batch(texts)]
    return cid, flags, arrays, end, sum(len(t.encode("utf-8", errors="replace")) for t in texts)


def _jobs(todo: list[tuple[int, list[Piece]]], field: str, val_fraction: float, batch_bytes: int = 1 << 20):
    """Batches of about ``batch_bytes`` of text, in document order; the last of a chunk has end=True."""
    for cid, pieces in todo:
        flags, texts, size = [], [], 0
        for p in pieces:
            for name, text in read_documents(p.file.path, p.file.fmt, field, p.file.name, p.row_groups):
                if not text:
                    continue
                flags.append(is_validation(name, val_fraction))
                texts.append(text)
                size += len(text)
                if size >= batch_bytes:
                    yield cid, flags, texts, False
                    flags, texts, size = [], [], 0
        yield cid, flags, texts, True


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
    """A progress bar (terminal) or a line every 15 s (logs) with MB/s, tokens/s and ETA."""

    def __init__(self, total_bytes: int):
        self.total, self.t0, self.last = total_bytes, time.time(), 0.0
        self.tty = sys.stderr.isatty() and not os.environ.get("CI")
        self.text_bytes = self.tokens = self.done_bytes = 0

    def update(self, text_bytes: int, tokens: int, done_bytes: int = 0, force: bool = False):
        self.text_bytes += text_bytes
        self.tokens += tokens
        self.done_bytes += done_bytes
        now = time.time()
        if not force and now - self.last < (0.5 if self.tty else 15):
            return
        self.last = now
        el = max(now - self.t0, 1e-9)
        frac = self.done_bytes / max(self.total, 1)
        eta = el * (1 - frac) / frac if frac > 0 else float("nan")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "?"
        text = (f"{100 * frac:5.1f}% {self.text_bytes / 1e6 / el:7.1f} MB/s {self.tokens / el:12,.0f} tok/s "
                f"{self.tokens:,} tokens ETA {eta_s}")
        if self.tty:
            bar = int(24 * frac)
            sys.stderr.write(f"\r[{'#' * bar}{'.' * (24 - bar)}] {text}  ")
            sys.stderr.flush()
        else:
            print(f"prepare: {text}", flush=True)

    def close(self):
        if self.tty:
            sys.stderr.write("\n")


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


def _settings(a: PrepareArgs, tok, dtype: np.dtype, chunks) -> dict:
    """What must agree between every run and part writing one directory."""
    plan = hashlib.sha256(json.dumps(_pieces_record(chunks)).encode()).hexdigest()
    return {"format": FORMAT, "prepare_version": PREPARE_VERSION, "sources": list(a.sources),
            "tokenizer": {"spec": "byte" if a.tokenizer == "byte" else Path(a.tokenizer).name,
                          "fingerprint": tok.fingerprint(), "vocab_size": int(tok.vocab_size),
                          "separator": int(tok.separator)},
            "dtype": dtype.name, "val_fraction": a.val_fraction, "text_field": a.text_field,
            "shard_tokens": a.shard_tokens, "chunk_mb": a.chunk_mb, "chunks": len(chunks), "input_plan": plan}


def _claim(out: Path, settings: dict):
    """Record the settings, or check that an earlier run / another part used the same ones."""
    path = out / "prepare.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        if diff:
            what = "the input files changed" if diff == ["input_plan"] else f"{', '.join(diff)} differ"
            raise DataError(f"--out {out} was prepared with other arguments or inputs ({what}); "
                            f"re-run with the same ones or use a new --out")
        return
    try:  # parts racing to create it write the same bytes
        _write_json(path, settings)
    except FileNotFoundError:
        pass


def merge(out: Path) -> dict | None:
    """Write ``manifest.json`` from the finished chunks; None while some chunk is unfinished."""
    settings = json.loads((out / "prepare.json").read_text())
    n = settings["chunks"]
    records = []
    for c in range(n):
        p = out / "chunks" / f"c{c:06d}.json"
        if not p.exists():
            return None
        records.append(json.loads(p.read_text()))
    splits = {}
    for split in ("train", "val"):
        shards = [s for r in records for s in r[split]]
        splits[split] = {"tokens": sum(s["tokens"] for s in shards), "documents": sum(s["documents"] for s in shards),
                         "shards": shards}
    manifest = {**settings, "text_bytes": sum(r["text_bytes"] for r in records), "splits": splits}
    if splits["train"]["tokens"] == 0:
        raise DataError(f"the sources {' '.join(settings['sources'])} hold no text")
    _write_json(out / "manifest.json", manifest)
    return manifest


def prepare(a: PrepareArgs) -> dict:
    """Prepare this part; returns a summary (and the manifest once every part is done)."""
    a.check()
    t0 = time.time()
    tok = make_tokenizer(a.tokenizer)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    files, skipped = list_inputs(a.sources, a.text_field)
    chunks = plan_chunks(files, int(a.chunk_mb * 1e6))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for d in ("train", "val", "chunks"):
        (out / d).mkdir(exist_ok=True)
    _claim(out, _settings(a, tok, dtype, chunks))
    if a.tokenizer != "byte" and not (out / "tokenizer.json").exists():
        shutil.copyfile(a.tokenizer, out / "tokenizer.json.tmp")  # the dataset names its own tokenizer
        os.replace(out / "tokenizer.json.tmp", out / "tokenizer.json")
    mine = [(c, p) for c, p in enumerate(chunks) if c % a.num_shards == a.shard_index]
    todo = [(c, p) for c, p in mine if not (out / "chunks" / f"c{c:06d}.json").exists()]
    part = f" part {a.shard_index}/{a.num_shards}:" if a.num_shards > 1 else ""
    print(f"prepare:{part} {len(files)} files ({sum(f.size for f in files) / 1e6:,.1f} MB) in {len(chunks)} chunks; "
          f"{len(mine)} chunks here, {len(mine) - len(todo)} already done"
          + (f"; skipped {len(skipped)} files of unknown type (e.g. {skipped[0]})" if skipped else ""), flush=True)
    meter = _Meter(sum(pc.file.size for _, ps in todo for pc in ps))
    writers: dict[int, dict[bool, ShardWriter]] = {}
    stats = {"documents": 0, "text_bytes": 0}
    per_chunk_bytes: dict[int, int] = {}

    def handle(result):
        cid, flags, arrays, end, nbytes = result
        w = writers.setdefault(cid, {v: ShardWriter(out, "val" if v else "train", cid, dtype, a.shard_tokens)
                                     for v in (False, True)})
        for is_val, t in zip(flags, arrays):
            w[is_val].add(t)
        stats["documents"] += len(arrays)
        stats["text_bytes"] += nbytes
        per_chunk_bytes[cid] = per_chunk_bytes.get(cid, 0) + nbytes
        done = 0
        if end:
            record = {"chunk": cid, "train": w[False].close(), "val": w[True].close(),
                      "text_bytes": per_chunk_bytes.pop(cid)}
            _write_json(out / "chunks" / f"c{cid:06d}.json", record)
            del writers[cid]
            done = sum(pc.file.size for pc in chunks[cid])
        meter.update(nbytes, sum(len(t) for t in arrays), done, force=end and done == meter.total)

    jobs = _jobs(todo, a.text_field, a.val_fraction)
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
    meter.close()
    manifest = merge(out)
    el = time.time() - t0
    summary = {"documents": stats["documents"], "text_bytes": stats["text_bytes"], "tokens": meter.tokens,
               "seconds": el, "mb_per_s": stats["text_bytes"] / 1e6 / max(el, 1e-9),
               "tokens_per_s": meter.tokens / max(el, 1e-9), "complete": manifest is not None}
    print(f"prepare:{part} {stats['documents']:,} documents, {stats['text_bytes'] / 1e6:,.1f} MB of text -> "
          f"{meter.tokens:,} tokens in {el:.1f} s ({summary['mb_per_s']:.1f} MB/s, {summary['tokens_per_s']:,.0f} tok/s)",
          flush=True)
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
