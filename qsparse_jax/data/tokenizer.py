"""Tokenizers: UTF-8 bytes (vocab 256) or any Hugging Face ``tokenizer.json`` (no download).

Both append nothing themselves; corpora join documents with ``separator`` (byte 0, or the
tokenizer's end-of-text token). ``fingerprint`` identifies a tokenizer in prepared-corpus manifests.
:func:`special_tokens` / :func:`special_token_ids` name a tokenizer's begin- and end-of-text tokens (from
the ``tokenizer_config.json`` beside it, as transformers reads them, else by the usual names).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import DataError

# names the common tokenizers give their begin- / end-of-text tokens (used when no tokenizer_config.json says)
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


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
        eos = next((t for t in EOS_NAMES if self._tok.token_to_id(t) is not None), None)
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



def special_tokens(tok) -> tuple[str | None, str | None]:
    """(BOS, end-of-text) token strings of an :class:`HFTokenizer`, either None when it has none: from
    ``tokenizer_config.json`` beside its ``tokenizer.json`` (``bos_token`` / ``eos_token``, plain or
    ``{"content": ...}``, as transformers reads them) when that names a token of the vocabulary, else the
    first of the usual names it has. The byte tokenizer has neither."""
    if tok.spec == "byte":
        return None, None
    t = tok._tok
    named = {}
    conf = Path(tok.spec).with_name("tokenizer_config.json")
    if conf.is_file():
        try:
            c = json.loads(conf.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{conf}: not valid JSON ({e.msg})") from None
        for key in ("bos_token", "eos_token"):
            v = c.get(key) if isinstance(c, dict) else None
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str) and t.token_to_id(v) is not None:
                named[key] = v
    find = lambda names: next((n for n in names if t.token_to_id(n) is not None), None)
    return named.get("bos_token", find(BOS_NAMES)), named.get("eos_token", find(EOS_NAMES))


def special_token_ids(tok) -> tuple[int | None, int]:
    """(BOS id or None, end-of-text id) of a tokenizer (:func:`special_tokens`); without an end-of-text
    token, its ``separator`` (byte 0 for the byte tokenizer, which has no BOS)."""
    bos, eos = special_tokens(tok)
    to_id = lambda s: None if s is None else tok._tok.token_to_id(s)
    eos_id = to_id(eos)
    return to_id(bos), (eos_id if eos_id is not None else tok.separator)
