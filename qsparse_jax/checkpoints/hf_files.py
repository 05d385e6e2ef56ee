"""The files of an HF model directory besides its weights: the tokenizer, atomic directory writes, progress.

- :func:`copy_tokenizer` writes a tokenizer into an export: ``tokenizer.json``, the files transformers'
  ``AutoTokenizer`` reads beside it (``tokenizer_config.json``, ``special_tokens_map.json``: copied when
  the source has them, else written with the special tokens named), and a chat template or SentencePiece
  model when present. :func:`hf_tokenizer` is the other direction: the one rule for which tokenizer an HF
  directory's model reads text with (its ``tokenizer.json``; bytes for a byte-vocabulary model, said once;
  else a one-line error).
- :func:`atomic_dir` builds a directory beside its target and renames it into place: a target holding
  anything is refused unless ``overwrite`` (then replaced whole, so no stale file survives); files end
  up mode 0644 and directories 0755.
- :class:`Progress` reports a long per-tensor loop: nothing for the first 10 s (small models stay quiet),
  then a tqdm bar on a terminal, else a plain line every 10 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from ..data.tokenizer import make_tokenizer, special_tokens
from .hf_config import HFError, qsparse_section

BYTE_VOCAB = 256
# what transformers' AutoTokenizer reads besides tokenizer.json, copied into an export when the source has it
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")
_NOTED: set[str] = set()  # directories whose byte fallback was already said


def hf_tokenizer(path: Path, hf: dict, vocab_size: int, *, required: bool = True, hint: str = "") -> str:
    """``data.tokenizer`` of an HF directory: its ``tokenizer.json``; ``"byte"`` when config.json says so
    (our ``qsparse.tokenizer``) or, without one, when the vocabulary is the byte vocabulary (a note, once
    per directory). Otherwise the model needs a tokenizer the directory lacks: a one-line error naming
    ``hint`` (another way to give one), or with ``required=False`` the missing file's path (an error
    when something reads text with it)."""
    tok = path / "tokenizer.json"
    if tok.is_file():
        return str(tok.absolute())
    mark = qsparse_section(hf).get("tokenizer")
    if mark == "byte":
        return "byte"
    if mark is None and vocab_size == BYTE_VOCAB:
        if str(path) not in _NOTED:
            _NOTED.add(str(path))
            print(f"note: {path} has no tokenizer.json; its vocab_size is {BYTE_VOCAB}, so text is read as UTF-8 "
                  "bytes", file=sys.stderr)
        return "byte"
    if required:
        why = "its config.json names one" if mark else f"its vocab_size {vocab_size} is not the byte vocabulary ({BYTE_VOCAB})"
        raise HFError(f"{path} has no tokenizer.json and {why}: put the model's tokenizer.json (and "
                      f"tokenizer_config.json) there{hint}")
    return str(tok.absolute())


def copy_tokenizer(spec: str, out: Path, max_len: int) -> tuple[int | None, int | None]:
    """Write tokenizer ``spec`` (a ``tokenizer.json``) into ``out`` as AutoTokenizer loads it; the (BOS,
    EOS) token ids, for config.json. ``max_len``: ``model_max_length`` of a written tokenizer_config.json."""
    src = Path(spec)
    if not src.is_file():
        raise HFError(f"the model's tokenizer {spec} does not exist any more: it is written into the export, "
                      "so put it back (or set data.tokenizer in the checkpoint's config) and export again")
    tok = make_tokenizer(spec)
    bos, eos = special_tokens(tok)
    shutil.copyfile(src, out / "tokenizer.json")
    for name in SIDE_FILES:
        if (src.parent / name).is_file():
            shutil.copyfile(src.parent / name, out / name)
    named = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
    if not (out / "tokenizer_config.json").exists():
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", **named, "model_max_length": max_len,
             "clean_up_tokenization_spaces": False}, indent=2))
    if not (out / "special_tokens_map.json").exists():
        (out / "special_tokens_map.json").write_text(json.dumps(named, indent=2))
    to_id = lambda s: None if s is None else tok._tok.token_to_id(s)
    return to_id(bos), to_id(eos)


def copy_tokenizer_side_files(src: Path, out: Path):
    """The files beside ``src``'s tokenizer.json that AutoTokenizer reads (:data:`SIDE_FILES`), into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / f"{name}.tmp")
            os.replace(out / f"{name}.tmp", out / name)


def check_target(path: Path, overwrite: bool, protect: Path | None = None):
    """One-line error unless ``path`` may receive a new directory: absent, empty, or ``overwrite`` (then never
    a directory holding ``protect``, e.g. the checkpoint being exported)."""
    if path.exists() and not path.is_dir():
        raise HFError(f"{path} exists and is not a directory; choose a directory path")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise HFError(f"{path} is not empty; choose a new directory, or pass --overwrite to replace it whole")
        if protect is not None and Path(protect).resolve().is_relative_to(path.resolve()):
            raise HFError(f"--overwrite would delete {path}, which holds the checkpoint {protect}; choose another "
                          "directory")


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False):
    """Yield an empty directory beside ``path`` to write into; on success set modes (files 0644, directories
    0755) and rename it to ``path`` (:func:`check_target` first); on any error remove it, ``path`` untouched."""
    path = Path(path)
    check_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for d, _, files in os.walk(tmp):
            os.chmod(d, 0o755)
            for f in files:
                os.chmod(os.path.join(d, f), 0o644)
        old = None
        if path.is_dir() and any(path.iterdir()):  # overwrite (checked): swap, then delete the old one
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        elif path.is_dir():
            path.rmdir()
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Progress:
    """``update()`` once per tensor of ``total``: quiet for ``delay`` seconds, then a tqdm bar when stderr is a
    terminal, else a line ``{what}: i/total tensors`` every ``delay`` seconds."""

    def __init__(self, total: int, what: str, delay: float = 10.0):
        self.total, self.what, self.delay = total, what, delay
        self.start = self.last = time.monotonic()
        self.done = 0
        self.bar = tqdm(total=total, desc=what, unit="tensor", delay=delay, file=sys.stderr, leave=False) \
            if sys.stderr.isatty() else None

    def update(self, n: int = 1):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.delay:
            self.last = now
            print(f"{self.what}: {self.done}/{self.total} tensors, {now - self.start:.0f} s", file=sys.stderr,
                  flush=True)

    def note(self, text: str):
        """A line about a long step after the loop (only once the whole is long enough to report)."""
        if time.monotonic() - self.start >= self.delay:
            tqdm.write(f"{self.what}: {text}", file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()
