"""Checkpoint conversion between Hugging Face directories and our orbax checkpoints.

``python -m qsparse_jax.convert import-hf SRC WORKDIR [--scan-layers]``: an HF Llama / Mistral / Qwen2 directory →
``WORKDIR/checkpoints/0`` (parameters) plus ``WORKDIR/config.yaml`` (the model's config, and the
model's ``tokenizer.json`` as data.tokenizer when it has one). Continue training it with
``train.py --config WORKDIR/config.yaml --init_from WORKDIR/checkpoints --workdir RUN model.sparsity.qkv=0.4 ...``.

``python -m qsparse_jax.convert export-hf CKPT DST``: a training run's checkpoint directory (or one
step of it) → an HF directory ``transformers`` loads (dense float32 weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

from flax import nnx

from .config import Config, ConfigError, DataConfig, from_dict, to_dict
from .model import Transformer


def empty_checkpoints_dir(workdir: str | Path, what: str = "WORKDIR") -> Path:
    """``workdir/checkpoints``, refusing one that already holds checkpoints (nothing is overwritten)."""
    ckpt_dir = Path(workdir) / "checkpoints"
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise ConfigError(f"{ckpt_dir} already holds checkpoints; choose an empty {what}")
    return ckpt_dir


def write_model_checkpoint(model, cfg: Config, workdir: str | Path, *, tokenizer_from: str | Path | None = None,
                           what: str = "WORKDIR") -> Path:
    """A model as ``WORKDIR/checkpoints/0`` (parameters) + ``WORKDIR/config.yaml``: a checkpoint that trains
    (``--init_from``), evaluates and exports like any other. ``tokenizer_from``: a directory whose
    ``tokenizer.json`` is copied in and becomes ``data.tokenizer``."""
    from . import checkpoint as ckpt
    from .trainer import write_config

    out = Path(workdir)
    ckpt_dir = empty_checkpoints_dir(out, what)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None and (Path(tokenizer_from) / "tokenizer.json").is_file():
        shutil.copy(Path(tokenizer_from) / "tokenizer.json", out / "tokenizer.json")
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str((out / "tokenizer.json").absolute())))
    _, params = nnx.split(model)
    mngr = ckpt.manager(ckpt_dir, cfg.checkpoint)
    ckpt.save(mngr, 0, {"params": params}, {}, to_dict(cfg), force=True)
    mngr.wait_until_finished()
    mngr.close()
    write_config(out, cfg)
    return ckpt_dir


def import_hf(src: str, workdir: str, scan_layers: bool = False) -> Path:
    from .hf import load_pretrained

    empty_checkpoints_dir(workdir)  # before the (long) load
    model = load_pretrained(src, scan_layers=scan_layers)
    cfg = Config(model=model.config, data=DataConfig(seq_len=min(DataConfig.seq_len, model.config.max_seq_len)))
    return write_model_checkpoint(model, cfg, workdir, tokenizer_from=src)


def load_checkpoint_model(ckpt_path: str, mesh=None):
    """(config, params, graphdef) of a training checkpoint directory (latest step) or one step of it.

    Parameters are read straight into their shards on ``mesh`` (default: FSDP over every local
    device), so no device ever holds a whole large model."""
    import jax

    from . import checkpoint as ckpt
    from .config import MeshConfig
    from .sharding import make_mesh, state_shardings

    saved, step_dir = ckpt.read_config(ckpt_path)
    cfg = from_dict(Config, saved)
    graphdef, like = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
    shardings = state_shardings(like, mesh or make_mesh(MeshConfig(data=1, fsdp=-1), jax.local_devices()))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), like, shardings)
    return cfg, ckpt.restore_params(step_dir, target, what=""), graphdef


def export_hf(ckpt_path: str, dst: str, model_type: str | None = None, ternary: bool = False) -> Path:
    from .hf import save_pretrained

    cfg, params, graphdef = load_checkpoint_model(ckpt_path)
    save_pretrained(nnx.merge(graphdef, params), dst, model_type=model_type, ternary=ternary)
    if cfg.model.sparsity.enabled:
        print("note: transformers runs the exported weights with dense activations (top-K is not part of its "
              "models); qsparse_jax.hf.load_pretrained restores the top-K sparsity", file=sys.stderr)
    return Path(dst)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsparse_jax.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import-hf", help="HF directory -> orbax checkpoint + config.yaml")
    imp.add_argument("src")
    imp.add_argument("workdir")
    imp.add_argument("--scan-layers", action="store_true",
                     help="stack the layers for model.scan_layers (compile time independent of depth)")
    exp = sub.add_parser("export-hf", help="orbax checkpoint -> HF directory")
    exp.add_argument("ckpt")
    exp.add_argument("dst")
    exp.add_argument("--model-type", choices=["llama", "mistral", "qwen2", "bitnet"], default=None)
    exp.add_argument("--ternary", action="store_true",
                     help="1.58-bit models: write 2-bit packed ternary weights + scales (transformers' bitnet)")
    args = p.parse_args(argv)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        if args.cmd == "import-hf":
            out = import_hf(args.src, args.workdir, args.scan_layers)
        else:
            out = export_hf(args.ckpt, args.dst, args.model_type, args.ternary)
    except ConfigError as e:  # HFError and CheckpointError are ConfigErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
