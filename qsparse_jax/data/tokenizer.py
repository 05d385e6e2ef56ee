"""Tokenizers: UTF-8 bytes (vocab 256) or any Hugging Face ``tokenizer.json`` (no download).

Both append nothing themselves; corpora join documents with ``separator`` (byte 0, or the
tokenizer's end-of-text token). ``fingerprint`` identifies a tokenizer in prepared-corpus manifests.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..errors import DataError


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256); byte 0 separates documents."""

    vocab_size = 256
    separator = 0
    spec = "byte"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), np.uint8)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, np.uint8).tolist()).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "byte"


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
        self.spec = path
        self.vocab_size = self._tok.get_vocab_size()
        eos = next((t for t in ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>") if self._tok.token_to_id(t) is not None), None)
        self.separator = self._tok.token_to_id(eos) if eos else 0

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        """sha256 of the tokenizer.json bytes: the same file wherever it lives."""
        return "sha256:" + hashlib.sha256(Path(self.spec).read_bytes()).hexdigest()


def make_tokenizer(spec: str):
    if spec == "byte":
        return ByteTokenizer()
    if not Path(spec).is_file():
        raise DataError(f"data.tokenizer: no such file {spec!r} (use 'byte' or a path to tokenizer.json)")
    return HFTokenizer(spec)

