"""One place that loads a model for inference: ``--hf DIR`` or ``--ckpt DIR``, its tokenizer and special
tokens, a data-parallel mesh over the local devices, and variants of the same weights under another
sparsity or the packed kernels. ``eval``, ``generate`` and the lm-eval backend all load through here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jax
from jax.sharding import Mesh

from ..config import MeshConfig
from ..data.tokenizer import make_tokenizer
from ..errors import ConfigError
from ..nn.model import Transformer
from ..nn.sharding import make_mesh
from .hf import load_pretrained
from .native import load_checkpoint_model

# names the common tokenizers give their begin- / end-of-text tokens (used when no tokenizer_config.json says)
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")


_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


@dataclass(frozen=True)
class Loaded:
    """A model ready for inference: weights (placed on ``mesh``), tokenizer, and its special tokens.

    ``eos_id`` ends generation; ``prefix_id`` conditions a log-likelihood whose context is empty (BOS when
    the tokenizer has one, else end-of-text: lm-eval's ``HFLM.prefix_token_id``)."""

    model: Transformer
    tokenizer: object
    bos_id: int | None
    eos_id: int
    mesh: Mesh
    source: str

    @property
    def prefix_id(self) -> int:
        return self.bos_id if self.bos_id is not None else self.eos_id


def local_mesh() -> Mesh:
    """Every local device on the ``data`` axis: inference is data-parallel (parameters replicated by the
    sharding rules, since neither fsdp nor tensor is split)."""

    return make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1), jax.local_devices())


def load(hf: str | None = None, ckpt: str | None = None, *, tokenizer: str | None = None,
         mesh: Mesh | None = None) -> Loaded:
    """The model and tokenizer of an HF directory (``hf``) or a training checkpoint (``ckpt``: a run's
    ``checkpoints`` directory, latest step, or one step of it). Parameters are read straight into their
    shards on ``mesh`` (default :func:`local_mesh`). The tokenizer is ``tokenizer`` if given, else the HF
    directory's ``tokenizer.json`` (bytes without one) or the checkpoint's ``data.tokenizer``."""
    from flax import nnx


    if (hf is None) == (ckpt is None):
        raise ConfigError("give exactly one of hf=DIR or ckpt=DIR")
    path = Path(hf or ckpt)
    if not path.is_dir():
        raise ConfigError(f"{'hf' if hf else 'ckpt'}: no such directory {str(path)!r}")
    mesh = mesh or local_mesh()
    if hf is not None:

        model = load_pretrained(path, mesh=mesh)
        tok_spec = tokenizer or (str(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else "byte")
    else:

        cfg, params, graphdef = load_checkpoint_model(str(path), mesh)
        model = nnx.merge(graphdef, params)
        tok_spec = tokenizer or cfg.data.tokenizer
    tok = make_tokenizer(tok_spec)
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(f"tokenizer {tok_spec} has {tok.vocab_size} tokens, more than the model's vocab_size "
                          f"{model.config.vocab_size}")
    bos, eos = special_token_ids(tok)
    return Loaded(model, tok, bos, eos, mesh, str(path))


def special_token_ids(tok) -> tuple[int | None, int]:
    """(BOS id or None, end-of-text id) of a tokenizer: from ``tokenizer_config.json`` beside its
    ``tokenizer.json`` (``bos_token`` / ``eos_token``, as transformers reads them), else by the usual
    token names; the byte tokenizer has no BOS and ends text with byte 0."""
    if tok.spec == "byte":
        return None, tok.separator
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(tok.spec)
    named = {}
    conf = Path(tok.spec).with_name("tokenizer_config.json")
    if conf.is_file():
        try:
            c = json.loads(conf.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{conf}: not valid JSON ({e.msg})") from None
        for key in ("bos_token", "eos_token"):
            v = c.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str) and t.token_to_id(v) is not None:
                named[key] = t.token_to_id(v)
    find = lambda names: next((t.token_to_id(n) for n in names if t.token_to_id(n) is not None), None)
    bos = named.get("bos_token", find(_BOS_NAMES))
    eos = named.get("eos_token", find(_EOS_NAMES))
    return bos, (eos if eos is not None else tok.separator)

