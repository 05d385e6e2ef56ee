"""The one source resolver: ``--hf DIR`` or ``--ckpt DIR`` → model, run config, tokenizer and special tokens.

Every tool that reads a model goes through here: ``eval``, ``generate``, the lm-eval backend, ``prune``,
``lte convert`` and the distillation teacher. :func:`load_model` gives the model and its run config
(a checkpoint's saved config; for an HF directory the model's config with
``DataConfig.for_model``'s data section), placing the parameters straight into their shards;
:func:`load` adds the tokenizer and its special tokens, on a data-parallel mesh over the local devices;
:func:`source_config` reads the config alone (nothing is loaded: compile-only planning). An HF
directory's tokenizer is its ``tokenizer.json``; bytes only for a byte-vocabulary model (said once); a
model that needs a tokenizer the directory lacks is a one-line error when text is read
(:func:`.hf_files.hf_tokenizer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh

from ..config import Config, DataConfig, MeshConfig, from_dict
from ..data.tokenizer import make_tokenizer, special_token_ids
from ..errors import ConfigError
from ..nn.model import Transformer
from ..nn.sharding import make_mesh
from .hf import load_pretrained, read_hf_config
from .hf_files import hf_tokenizer
from .native import load_checkpoint_model, read_config


@dataclass(frozen=True)
class Loaded:
    """A model ready for inference: weights (placed on ``mesh``), run config, tokenizer, special tokens.

    ``eos_id`` ends generation; ``prefix_id`` conditions a log-likelihood whose context is empty (BOS when
    the tokenizer has one, else end-of-text: lm-eval's ``HFLM.prefix_token_id``)."""

    model: Transformer
    tokenizer: object
    bos_id: int | None
    eos_id: int
    mesh: Mesh
    source: str
    config: Config

    @property
    def prefix_id(self) -> int:
        return self.bos_id if self.bos_id is not None else self.eos_id


def local_mesh() -> Mesh:
    """Every local device on the ``data`` axis: inference is data-parallel (parameters replicated by the
    sharding rules, since neither fsdp nor tensor is split)."""
    return make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1), jax.local_devices())


def is_hf(path: str | Path) -> bool:
    """Whether a directory is a Hugging Face model (it has ``config.json``) rather than our checkpoint."""
    return (Path(path) / "config.json").is_file()


def _source(hf: str | None, ckpt: str | None, flags: tuple[str, str]) -> tuple[Path, bool]:
    if (hf is None) == (ckpt is None):
        raise ConfigError(f"give exactly one of {flags[0]} DIR or {flags[1]} DIR")
    path = Path(hf or ckpt)
    if not path.is_dir():
        raise ConfigError(f"{flags[0] if hf else flags[1]}: no such directory {str(path)!r}")
    return path, hf is not None


def _hf_config(path: Path, hf: dict, model_config, tokenizer: str | None = None) -> Config:
    """The run config of an HF directory: ``tokenizer`` if given, else the directory's
    (:func:`.hf_files.hf_tokenizer`; a missing one is an error only when text is read)."""
    tok = tokenizer or hf_tokenizer(path, hf, model_config.vocab_size, required=False)
    return Config(model=model_config, data=DataConfig.for_model(model_config, tok))


def source_config(hf: str | None = None, ckpt: str | None = None, *,
                  flags: tuple[str, str] = ("--hf", "--ckpt")) -> Config:
    """The run config of a source without loading any weights."""
    path, from_hf = _source(hf, ckpt, flags)
    if from_hf:
        return _hf_config(path, *read_hf_config(path))
    return from_dict(Config, read_config(str(path))[0])


def load_model(hf: str | None = None, ckpt: str | None = None, *, mesh: Mesh | None = None,
               flags: tuple[str, str] = ("--hf", "--ckpt"), tokenizer: str | None = None) -> tuple[Transformer, Config]:
    """(model, run config) of an HF directory (``hf``) or a training checkpoint (``ckpt``: a run's
    ``checkpoints`` directory, latest step, or one step of it). Parameters are read straight into their
    shards on ``mesh`` (default: FSDP over every local device). ``flags`` name the two options in errors;
    ``tokenizer`` replaces an HF directory's own in the run config."""
    path, from_hf = _source(hf, ckpt, flags)
    if from_hf:
        model = load_pretrained(path, mesh=mesh)
        return model, _hf_config(path, read_hf_config(path)[0], model.config, tokenizer)
    cfg, params, graphdef = load_checkpoint_model(str(path), mesh)
    return nnx.merge(graphdef, params), cfg


def load(hf: str | None = None, ckpt: str | None = None, *, tokenizer: str | None = None,
         mesh: Mesh | None = None) -> Loaded:
    """The model, run config and tokenizer of an HF directory or a training checkpoint (:func:`load_model`),
    on ``mesh`` (default :func:`local_mesh`). The tokenizer is ``tokenizer`` if given, else the run
    config's ``data.tokenizer`` (an HF directory's ``tokenizer.json``; bytes only for a byte-vocabulary
    model; else a one-line error, before any weight is read)."""
    if hf is not None and tokenizer is None and is_hf(hf):
        raw, model_config = read_hf_config(hf)
        hf_tokenizer(Path(hf), raw, model_config.vocab_size, hint=", or give --tokenizer")
    mesh = mesh or local_mesh()
    model, cfg = load_model(hf, ckpt, mesh=mesh, tokenizer=tokenizer)
    tok_spec = tokenizer or cfg.data.tokenizer
    tok = make_tokenizer(tok_spec)
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(f"tokenizer {tok_spec} has {tok.vocab_size} tokens, more than the model's vocab_size "
                          f"{model.config.vocab_size}")
    bos, eos = special_token_ids(tok)
    return Loaded(model, tok, bos, eos, mesh, str(hf or ckpt), cfg)
