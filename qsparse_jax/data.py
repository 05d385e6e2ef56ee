"""Input pipeline: corpora → tokens → packed windows → deterministic, resumable grain batches.

The default corpus is embedded in every Python install: the standard library's own ``.py`` sources.
Documents are split into train / validation by a hash of their name (stable across runs and
machines), tokenized (bytes by default, or any HF ``tokenizer.json``), joined with a separator token
and cut into windows of ``seq_len + 1`` tokens. A grain ``MapDataset`` shuffles windows with a seed,
shards them over hosts and batches them; batch ``i`` is a pure function of ``(seed, i)``, so the
iterator state saved in checkpoints is one integer and a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import json
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grain
import jax
import numpy as np

from .config import ConfigError, DataConfig

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text"}


class DataError(ConfigError):
    """A data source is missing, empty or unreadable (one line)."""


# --- tokenizers ----------------------------------------------------------------------------------

class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256); byte 0 separates documents."""

    vocab_size = 256
    separator = 0

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), np.uint8)

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, np.uint8).tolist()).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library (no download)."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError("data.tokenizer names a tokenizer.json but the 'tokenizers' package is not installed") from None
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises its own Exception type
            raise DataError(f"cannot load tokenizer {path}: {str(e).splitlines()[0]}") from None
        self.vocab_size = self._tok.get_vocab_size()
        eos = next((t for t in ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>") if self._tok.token_to_id(t) is not None), None)
        self.separator = self._tok.token_to_id(eos) if eos else 0

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def make_tokenizer(spec: str):
    if spec == "byte":
        return ByteTokenizer()
    if not Path(spec).is_file():
        raise DataError(f"data.tokenizer: no such file {spec!r} (use 'byte' or a path to tokenizer.json)")
    return HFTokenizer(spec)


# --- documents -----------------------------------------------------------------------------------

def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files (site-packages excluded), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py") if "site-packages" not in f.parts and "dist-packages" not in f.parts]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def _jsonl_documents(path: Path, field: str) -> Iterator[tuple[str, str]]:
    for i, line in enumerate(_read_text(path).splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
            raise DataError(f"{path}:{i + 1}: expected an object with a string field '{field}'")
        yield f"{path}:{i + 1}", rec[field]


def _arrayrecord_documents(path: Path, field: str) -> Iterator[tuple[str, str]]:
    source = grain.sources.ArrayRecordDataSource([str(path)])
    for i in range(len(source)):
        raw = source[i]
        try:
            text = raw.decode("utf-8")
            if text.lstrip().startswith("{"):
                text = json.loads(text)[field]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path} record {i}: expected UTF-8 text or a JSON object with '{field}'") from None
        yield f"{path}#{i}", text


def _file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix in (".arrayrecord", ".array_record") or ".array_record" in path.name:
        return "arrayrecord"
    return "text"


def iter_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """(name, text) for every document of the configured corpus, in a fixed order."""
    if cfg.source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        for f in stdlib_files():
            yield f.relative_to(root).as_posix(), _read_text(f)
        return
    src = Path(cfg.source)
    if not src.exists():
        raise DataError(f"data.source: no such file or directory: {cfg.source}")
    files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
    if src.is_dir() and cfg.format == "auto":
        files = [p for p in files if p.suffix in TEXT_SUFFIXES | {".jsonl", ".arrayrecord", ".array_record"}]
    for f in files:
        fmt = _file_format(f, cfg.format)
        if fmt == "jsonl":
            yield from _jsonl_documents(f, cfg.text_field)
        elif fmt == "arrayrecord":
            yield from _arrayrecord_documents(f, cfg.text_field)
        else:
            yield str(f), _read_text(f)


def is_validation(name: str, fraction: float) -> bool:
    """Stable split: a document is validation when a CRC of its name falls below the fraction."""
    return zlib.crc32(name.encode()) % 1_000_000 < fraction * 1_000_000


# --- packing and batching ------------------------------------------------------------------------

@dataclass
class TokenSplits:
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    n_docs: tuple[int, int]


def tokenize_corpus(cfg: DataConfig, tokenizer=None) -> TokenSplits:
    """All documents tokenized and joined with the separator, split into train and validation."""
    tok = tokenizer or make_tokenizer(cfg.tokenizer)
    parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
    sep = np.asarray([tok.separator], np.int32)
    for name, text in iter_documents(cfg):
        if text:
            parts[is_validation(name, cfg.val_fraction)] += [tok.encode(text).astype(np.int32), sep]
    if not parts[False] and not parts[True]:
        raise DataError(f"data.source {cfg.source!r} holds no text")
    if not parts[True] or not parts[False]:  # tiny corpora: hold out the last document instead
        docs = [p for p in parts[False] + parts[True]]
        if len(docs) < 4:
            raise DataError(f"data.source {cfg.source!r} needs at least 2 documents for a train/validation split")
        parts = {False: docs[:-2], True: docs[-2:]}
    n_docs = (len(parts[False]) // 2, len(parts[True]) // 2)
    return TokenSplits(np.concatenate(parts[False]), np.concatenate(parts[True]), tok.vocab_size, n_docs)


class Windows:
    """Random-access windows of ``seq_len + 1`` tokens, stride ``seq_len`` (grain data source)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.n = (len(tokens) - 1) // seq_len

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        s = int(i) * self.seq_len
        return self.tokens[s:s + self.seq_len + 1]


class Rows:
    """Random access to packed SFT rows (a dict of equally long arrays): row ``i`` is a dict."""

    def __init__(self, rows: dict[str, np.ndarray]):
        self.rows = rows
        self.n = len(rows["tokens"])

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: v[int(i)] for k, v in self.rows.items()}


def batch_source(data, seq_len: int):
    """Windows of an LM token stream, or the rows of packed SFT examples."""
    return Rows(data) if isinstance(data, dict) else Windows(data, seq_len)


def _stack(items: list):
    if isinstance(items[0], dict):
        return {k: np.stack([it[k] for it in items]) for k in items[0]}
    return np.stack(items).astype(np.int32)


def _slice(batch, start: int, size: int):
    if isinstance(batch, dict):
        return {k: np.asarray(v[start:start + size]) for k, v in batch.items()}
    return np.asarray(batch[start:start + size], np.int32)


def _host_batch(global_batch: int) -> int:
    n = jax.process_count()
    if global_batch % n:
        raise DataError(f"data.batch_size={global_batch} must be divisible by the number of hosts {n}")
    return global_batch // n


def train_dataset(tokens, cfg: DataConfig) -> grain.MapDataset:
    """Shuffled (seeded), repeated, host-sharded batches of this host's share of the global batch.

    ``tokens``: an LM token stream (batches are int32 [B, seq_len + 1]) or packed SFT rows (batches
    are dicts of such arrays, see ``sft.py``)."""
    windows = batch_source(tokens, cfg.seq_len)
    if len(windows) < cfg.batch_size:
        raise DataError(f"the training split has {len(windows)} rows of {cfg.seq_len + 1} tokens, fewer than "
                        f"data.batch_size={cfg.batch_size}: use more text or a shorter data.seq_len")
    ds = grain.MapDataset.source(windows).shuffle(seed=cfg.seed).repeat(None)
    # every host reads a disjoint slice of each global batch
    per_host = _host_batch(cfg.batch_size)
    ds = ds.batch(cfg.batch_size, drop_remainder=True)
    start = jax.process_index() * per_host
    return ds.map(lambda b: _slice(b, start, per_host))


def val_batches(tokens, cfg: DataConfig, n_batches: int) -> list:
    """The first ``n_batches`` validation batches in order (fewer if the split is short)."""
    windows = batch_source(tokens, cfg.seq_len)
    per_host = _host_batch(cfg.batch_size)
    n = min(n_batches, len(windows) // cfg.batch_size)
    if n == 0:
        raise DataError(f"the validation split has {len(windows)} windows, fewer than data.batch_size={cfg.batch_size}")
    start = jax.process_index() * per_host
    return [_stack([windows[b * cfg.batch_size + start + j] for j in range(per_host)]) for b in range(n)]
