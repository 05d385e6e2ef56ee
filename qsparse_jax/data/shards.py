"""The prepared-corpus format and its reader: token shards memory-mapped as one virtual array.

``prepare.py`` writes the format (:data:`FORMAT`, :data:`PREPARE_VERSION`, ``manifest.json``); this
module reads it.

Opening costs one ``stat`` per shard (to catch missing or truncated files) and no reads; a window
``tokens[a:b]`` maps only the shards it touches and copies only those pages, so start-up time and
resident memory do not grow with the corpus, and each host touches only the pages of its own rows.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import DataError

PREPARE_VERSION = 2  # 2: plain text files split by --split_docs (default: lines); invalid UTF-8 counted (invalid_utf8)
FORMAT = "qsparse-jax prepared tokens"
MANIFEST = "manifest.json"


def is_prepared(path: str | Path) -> bool:
    """A directory written by ``qsparse prepare`` (finished or not)."""
    p = Path(path)
    return (p / MANIFEST).is_file() or (p / "prepare.json").is_file()


def read_manifest(path: str | Path) -> dict:
    p = Path(path)
    if not (p / MANIFEST).is_file():
        if (p / "prepare.json").is_file():
            try:
                n = json.loads((p / "prepare.json").read_text())["chunks"]
            except (OSError, ValueError, KeyError):
                n = "?"
            done = len(list((p / "chunks").glob("c*.json")))
            raise DataError(f"{p} is an unfinished prepare ({done} of {n} chunks): re-run the same prepare command "
                            f"(every part), or prepare --merge after copying the parts together")
        raise DataError(f"{p} is not a prepared corpus (no {MANIFEST})")
    try:
        m = json.loads((p / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{p / MANIFEST}: unreadable ({e})") from None
    if m.get("format") != FORMAT or m.get("prepare_version", 0) > PREPARE_VERSION:
        raise DataError(f"{p / MANIFEST}: not a manifest this version reads (format {m.get('format')!r}, "
                        f"version {m.get('prepare_version')!r}; supported: {FORMAT!r} <= {PREPARE_VERSION})")
    return m


class ShardedTokens:
    """One split of a prepared corpus as a read-only 1-D token array: ``len()`` and ``[a:b]`` slices
    (returned as int32 copies), safe to read from several threads."""

    MAX_OPEN = 64  # mapped shards kept open (each holds a file descriptor)

    def __init__(self, root: str | Path, split: str, manifest: dict | None = None):
        self.root = Path(root)
        m = manifest or read_manifest(root)
        self.dtype = np.dtype(m["dtype"]).newbyteorder("<")
        shards = m["splits"][split]["shards"]
        self.files = [self.root / s["file"] for s in shards]
        self.sizes = np.asarray([s["tokens"] for s in shards], np.int64)
        for f, n in zip(self.files, self.sizes):
            try:
                have = f.stat().st_size
            except FileNotFoundError:
                raise DataError(f"{self.root}: shard {f.name} of the {split} split is missing "
                                f"(re-run prepare with the same arguments)") from None
            if have != n * self.dtype.itemsize:
                raise DataError(f"{self.root}: shard {f.name} is truncated or altered: {have} bytes, expected "
                                f"{n * self.dtype.itemsize} ({n} tokens); re-run prepare into a new --out")
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])
        self.n = int(self.starts[-1])
        self._open: OrderedDict[int, np.memmap] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.n

    def _map(self, i: int) -> np.memmap:
        with self._lock:
            mm = self._open.pop(i, None)
            if mm is None:
                mm = np.memmap(self.files[i], self.dtype, mode="r", shape=(int(self.sizes[i]),))
            self._open[i] = mm
            while len(self._open) > self.MAX_OPEN:
                self._open.popitem(last=False)
            return mm

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("ShardedTokens supports contiguous slices only")
        a, b, _ = key.indices(self.n)
        out = np.empty(max(b - a, 0), np.int32)
        i = int(np.searchsorted(self.starts, a, side="right")) - 1
        at = a
        while at < b:
            lo = at - int(self.starts[i])
            take = min(b - at, int(self.sizes[i]) - lo)
            out[at - a:at - a + take] = self._map(i)[lo:lo + take]
            at += take
            i += 1
        return out

