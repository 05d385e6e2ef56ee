"""Input pipeline: corpora → tokens → packed windows → deterministic, resumable grain batches.

The default corpus is embedded in every Python install: the standard library's own ``.py`` sources.
Documents are split into train / validation by a hash of their name (relative to the corpus, so
stable across runs, machines and moves of the corpus), tokenized (bytes by default, or any HF ``tokenizer.json``), joined with a separator token
and cut into windows of ``seq_len + 1`` tokens. Large corpora are tokenized once by
``qsparse prepare`` and memory-mapped here (``shards.py``); several prepared
corpora can be mixed by weight (``Mixture``). A grain ``MapDataset`` shuffles windows with a seed,
gives each host its rows of every global batch and reads them ahead in threads; batch ``i`` is a pure
function of ``(seed, i)``, so the iterator state saved in checkpoints is one integer and a resumed run
sees exactly the same batches.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import grain
import jax
import numpy as np

from ..config import DataConfig
from ..errors import DataError
from .corpus import (
    VAL_FRACTION,
    document_name,
    file_format,
    is_validation,
    read_documents,
    stdlib_files,
    stdlib_root,
)
from .sft import load_sft
from .shards import ShardedTokens, is_prepared, read_manifest
from .tokenizer import make_tokenizer


def _file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return file_format(path) or "text"


def documents(cfg: DataConfig) -> Iterator[tuple[str, str, int]]:
    """``(name, text, invalid UTF-8 bytes replaced)`` for every document of the configured corpus, in a
    fixed order, streamed. A text file is one document (``prepare --split_docs file``); names are
    relative to the corpus (``corpus.document_name``), so the split does not depend on where it lives."""
    if cfg.source == "stdlib":
        root = stdlib_root()
        for f in stdlib_files():
            yield from read_documents(f, "text", cfg.text_field, f.relative_to(root).as_posix())
        return
    src = Path(cfg.source)
    if not src.exists():
        raise DataError(f"data.source: no such file or directory: {cfg.source}")
    files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
    if src.is_dir() and cfg.format == "auto":
        files = [p for p in files if file_format(p) is not None]
    for f in files:
        yield from read_documents(f, _file_format(f, cfg.format), cfg.text_field, document_name(src, f))


def iter_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """(name, text) for every document of the configured corpus, in a fixed order, streamed."""
    for name, text, _ in documents(cfg):
        yield name, text


@dataclass
class TokenSplits:
    """Train / validation token streams: 1-D arrays (in memory), ``ShardedTokens`` (a prepared
    corpus), packed SFT rows (dicts), or for a mixture a ``Mixture`` of rows with one validation
    stream per source (``val_by_source``, averaged with ``weights``)."""

    train: Any
    val: Any
    vocab_size: int
    n_docs: tuple[int, int]
    val_by_source: dict[str, Any] | None = None
    weights: dict[str, float] | None = None
    mixture: "Mixture | None" = None
    train_tokens: int | None = None  # when ``train`` has no length (a mixture)


def tokenize_corpus(cfg: DataConfig, tokenizer=None) -> TokenSplits:
    """All documents tokenized and joined with the separator, split into train and validation."""
    tok = tokenizer or make_tokenizer(cfg.tokenizer)
    parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
    sep = np.asarray([tok.separator], np.int32)
    bad_docs = bad_bytes = 0
    first = ""
    fraction = VAL_FRACTION if cfg.val_fraction is None else cfg.val_fraction
    for name, text, bad in documents(cfg):
        if bad:
            bad_docs, bad_bytes, first = bad_docs + 1, bad_bytes + bad, first or name
        if text:
            parts[is_validation(name, fraction)] += [tok.encode(text).astype(np.int32), sep]
    if bad_docs and cfg.source != "stdlib":  # the embedded corpus's few bytes are nothing a user can act on
        print(f"note: data.source {cfg.source}: invalid UTF-8 in {bad_docs:,} documents ({bad_bytes:,} bytes, first: "
              f"{first}) read as U+FFFD", file=sys.stderr, flush=True)
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


def _host_batch(global_batch: int) -> int:
    n = jax.process_count()
    if global_batch % n:
        raise DataError(f"data.batch_size={global_batch} must be divisible by the number of hosts {n}")
    return global_batch // n


def load_splits(cfg: DataConfig) -> TokenSplits:
    """The configured corpus: a mixture, a prepared directory (memory-mapped), SFT examples, or
    documents tokenized in memory (the embedded ``stdlib`` default and small corpora)."""
    if cfg.task == "sft":
        s = load_sft(cfg)
        return TokenSplits(s.train, s.val, s.vocab_size, s.n_docs)
    if cfg.mixture:
        return _mixture_splits(cfg)
    if cfg.source != "stdlib" and is_prepared(cfg.source):
        return _prepared_splits(cfg.source, cfg)
    return tokenize_corpus(cfg)


def _prepared_splits(path: str, cfg: DataConfig) -> TokenSplits:
    m = read_manifest(path)
    tok = m["tokenizer"]
    mine = "byte" if cfg.tokenizer == "byte" else make_tokenizer(cfg.tokenizer).fingerprint()
    if mine != tok["fingerprint"]:
        raise DataError(f"{path} was prepared with tokenizer {tok['spec']} ({tok['fingerprint'][:19]}), not "
                        f"data.tokenizer={cfg.tokenizer}: set data.tokenizer="
                        + ("byte" if tok["fingerprint"] == "byte" else str(Path(path) / "tokenizer.json")))
    train, val = ShardedTokens(path, "train", m), ShardedTokens(path, "val", m)
    if len(val) == 0:
        raise DataError(f"{path} has no validation documents (prepared with --val_fraction {m['val_fraction']}); "
                        "prepare it again with a larger --val_fraction")
    if cfg.val_fraction is not None and abs(cfg.val_fraction - m["val_fraction"]) > 1e-12:
        print(f"note: data.val_fraction={cfg.val_fraction} does not apply to {path}: its split was made by prepare "
              f"(--val_fraction {m['val_fraction']})", file=sys.stderr, flush=True)
    docs = (m["splits"]["train"]["documents"], m["splits"]["val"]["documents"])
    return TokenSplits(train, val, tok["vocab_size"], docs)


def _mixture_splits(cfg: DataConfig) -> TokenSplits:
    parts = {}
    for ms in cfg.mixture:
        if not is_prepared(ms.source):
            raise DataError(f"data.mixture: {ms.source} is not a prepared corpus (run qsparse prepare)")
        parts[ms.label] = _prepared_splits(ms.source, cfg)
    total = sum(ms.weight for ms in cfg.mixture)
    weights = {ms.label: ms.weight / total for ms in cfg.mixture}
    sources = []
    for k, (name, sp) in enumerate(parts.items()):
        windows = Windows(sp.train, cfg.seq_len)
        if len(windows) == 0:
            raise DataError(f"data.mixture: {name} has fewer than data.seq_len + 1 = {cfg.seq_len + 1} train tokens")
        sources.append(_shuffled_rows(windows, (cfg.seed + 7919 * (k + 1)) % (1 << 31)))
    mix = Mixture(sources, list(weights.values()), cfg.seed)
    docs = tuple(sum(sp.n_docs[i] for sp in parts.values()) for i in (0, 1))
    return TokenSplits(mix, None, max(sp.vocab_size for sp in parts.values()), docs,
                       val_by_source={n: sp.val for n, sp in parts.items()}, weights=weights, mixture=mix,
                       train_tokens=sum(len(sp.train) for sp in parts.values()))


@functools.lru_cache(maxsize=64)
def _block_perm(seed: int, block: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, block]).permutation(size)


class Mixture:
    """Rows drawn from several sources in fixed proportions, as a pure function of the row index.

    Rows are grouped in blocks of ``BLOCK``; each block holds exactly ``q_m`` rows of source m
    (``q = BLOCK · w`` rounded by largest remainder) in a seeded random order, and source m's rows
    are taken in its own (shuffled) order: global row ``r`` in block ``b`` at position ``p`` is row
    ``b · q_m + (π_b(p) − start_m)`` of the source m whose slot range holds ``π_b(p)``. So any row,
    and the rows of each source among the first R, are computed without replaying the stream:
    exactly resumable, and each host reads only its own rows. (grain's ``MapDataset.mix`` interleaves
    in a fixed pattern; this is the same contract with a random interleaving.)"""

    BLOCK = 1000

    def __init__(self, sources: list, weights: list[float], seed: int):
        w = np.asarray(weights, np.float64) / np.sum(weights)
        raw = w * self.BLOCK
        quota = np.floor(raw).astype(np.int64)
        quota[np.argsort(-(raw - quota), kind="stable")[:self.BLOCK - quota.sum()]] += 1
        if (quota == 0).any():
            raise DataError(f"data.mixture: every weight must be at least 1/{self.BLOCK} of the total, got {list(w)}")
        self.sources, self.quota, self.seed = sources, quota, seed
        self.start = np.concatenate([[0], np.cumsum(quota)])

    def __len__(self):
        return sys.maxsize

    def locate(self, r: int) -> tuple[int, int]:
        b, p = divmod(int(r), self.BLOCK)
        slot = int(_block_perm(self.seed, b, self.BLOCK)[p])
        m = int(np.searchsorted(self.start, slot, side="right")) - 1
        return m, b * int(self.quota[m]) + slot - int(self.start[m])

    def __getitem__(self, r):
        m, j = self.locate(r)
        return self.sources[m][j]

    def counts(self, n_rows: int) -> np.ndarray:
        """Rows of each source among global rows ``[0, n_rows)``."""
        b, p = divmod(int(n_rows), self.BLOCK)
        head = _block_perm(self.seed, b, self.BLOCK)[:p]
        return b * self.quota + np.asarray([np.sum((head >= lo) & (head < hi))
                                            for lo, hi in zip(self.start[:-1], self.start[1:])])


def _shuffled_rows(rows, seed: int) -> grain.MapDataset:
    """``rows`` in a seeded random order, repeated forever (grain's index shuffle: nothing is read)."""
    return grain.MapDataset.source(rows).shuffle(seed=seed).repeat(None)


class HostBatches:
    """Batch ``i`` of this host: rows ``i·B + start + [0, per_host)`` of an endless row source, so a
    host reads (and pages in) only its own rows of each global batch."""

    def __init__(self, rows, batch_size: int, start: int, per_host: int):
        self.rows, self.batch_size, self.start, self.per_host = rows, batch_size, start, per_host

    def __len__(self):
        return sys.maxsize // self.batch_size

    def __getitem__(self, i):
        base = int(i) * self.batch_size + self.start
        return _stack([self.rows[base + j] for j in range(self.per_host)])


def train_dataset(tokens, cfg: DataConfig) -> grain.IterDataset:
    """Shuffled (seeded), repeated batches of this host's share of the global batch, read ahead by
    ``data.read_threads`` threads into a buffer of ``data.prefetch`` batches. Batch ``i`` is a pure
    function of (seed, i); the iterator's state (``get_state``) is the next batch index.

    ``tokens``: an LM token stream (batches are int32 [B, seq_len + 1]), packed SFT rows (batches
    are dicts of such arrays, see ``sft.py``) or a ``Mixture``."""
    if isinstance(tokens, Mixture):
        rows = tokens
    else:
        windows = batch_source(tokens, cfg.seq_len)
        if len(windows) < cfg.batch_size:
            raise DataError(f"the training split has {len(windows)} rows of {cfg.seq_len + 1} tokens, fewer than "
                            f"data.batch_size={cfg.batch_size}: use more text or a shorter data.seq_len")
        rows = _shuffled_rows(windows, cfg.seed)
    per_host = _host_batch(cfg.batch_size)
    batches = HostBatches(rows, cfg.batch_size, jax.process_index() * per_host, per_host)
    options = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch)
    return grain.MapDataset.source(batches).to_iter_dataset(options)


def val_batches(tokens, cfg: DataConfig, n_batches: int) -> list:
    """The first ``n_batches`` validation batches in order (fewer if the split is short)."""
    windows = batch_source(tokens, cfg.seq_len)
    per_host = _host_batch(cfg.batch_size)
    n = min(n_batches, len(windows) // cfg.batch_size)
    if n == 0:
        raise DataError(f"the validation split has {len(windows)} windows, fewer than data.batch_size={cfg.batch_size}")
    start = jax.process_index() * per_host
    return [_stack([windows[b * cfg.batch_size + start + j] for j in range(per_host)]) for b in range(n)]

