"""Our checkpoint format, read and written in one place: orbax (async, sharded, atomic, keep-last-N) + config.

Training checkpoints (:func:`manager`, :func:`save`, :func:`restore`), a model's parameters alone
(:func:`restore_params`, :func:`load_checkpoint_model`), a model written as a step-0 checkpoint for
``--init_from`` (:func:`write_model_checkpoint`: import-hf, prune, lte convert) and the run's
``config.yaml`` (:func:`write_config`).

A checkpoint at step N holds the train state (params, optimizer state, step), the data iterator's
state and the resolved config. orbax writes each step into a temporary directory and renames it
when complete, so a crash or kill during a save never damages the last complete checkpoint.
Restoring reads every array straight into the sharding of the *current* mesh, so a run saved on one
mesh shape resumes on another.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from ..config import CheckpointConfig, Config, MeshConfig, from_dict, to_dict
from ..errors import ConfigError
from ..nn.model import Transformer
from ..nn.sharding import make_mesh, state_shardings


class CheckpointError(ConfigError):
    """A checkpoint directory is missing or unreadable (one line)."""


def manager(directory: str | Path, cfg: CheckpointConfig, *, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                           create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict, config: dict, *, force: bool = False):
    """Start saving (async when configured); ``mngr.wait_until_finished()`` blocks until durable."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                            config=ocp.args.JsonSave(config)), force=force)


def _abstract(state):
    """ShapeDtypeStructs carrying each array's sharding: the restore target."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def restore(mngr: ocp.CheckpointManager, like_state, step: int | None = None):
    """(state, data_state, config) from ``step`` (default: latest), laid out like ``like_state``."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {mngr.directory}")
    try:
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(like_state)),
                                                         data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
    except Exception as e:  # structure mismatch, corrupt files: orbax raises many types
        raise CheckpointError(f"cannot restore step {step} from {mngr.directory} into this run's state "
                              f"(was it written by a different model or optimizer config?): "
                              f"{str(e).splitlines()[0][:200]}") from None
    return out["state"], out["data"], out["config"]


def _read(path: str | Path, what: str, read):
    """Open a checkpoint directory (its latest step) or one step directory of it read-only and return
    ``read(manager, step)``; every failure is a one-line CheckpointError starting with ``what``."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{what}no such checkpoint directory: {path}")
    root, step = (p.parent, int(p.name)) if (p / "state").is_dir() and p.name.isdigit() else (p, None)
    try:
        mngr = ocp.CheckpointManager(root.absolute(), options=ocp.CheckpointManagerOptions(read_only=True, create=False))
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{what}no checkpoint in {path}")
        return read(mngr, step)
    except CheckpointError:
        raise
    except Exception as e:  # orbax raises many types for unreadable directories
        raise CheckpointError(f"{what}cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from None


def restore_params(path: str | Path, like_params, what: str = "--init_from: ", allow_missing: bool = False):
    """Parameters only, from a checkpoint directory (its latest step) or a step directory (``--init_from``).

    With ``allow_missing``, leaves of ``like_params`` the checkpoint lacks (a method's added state: AST
    masks, SLoRB, LTE routers, when starting from a dense model) keep their values: returns
    ``(params, [missing paths])``."""
    if not allow_missing:
        target = {"params": _abstract(like_params)}
        args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
        return _read(path, what, lambda mngr, step: mngr.restore(step, args=args)["state"]["params"])

    def read(mngr, step):
        meta = ocp.PyTreeCheckpointer().metadata(Path(mngr.directory) / str(step) / "state")
        saved = getattr(meta, "item_metadata", meta)["params"]
        have = {_plain_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(saved)[0]}
        flat = jax.tree_util.tree_flatten_with_path(like_params)[0]
        present = {_plain_path(p) for p, _ in flat} & have
        sub = _prune(like_params, present)
        target = {"params": _abstract(sub)}
        args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
        loaded = mngr.restore(step, args=args)["state"]["params"]
        got = {_plain_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
        params = jax.tree_util.tree_map_with_path(lambda p, v: got.get(_plain_path(p), v), like_params)
        missing = sorted("/".join(map(str, p)) for p in {_plain_path(p) for p, _ in flat} - have)
        return params, missing

    return _read(path, what, read)


def _plain_path(path) -> tuple:
    """A leaf's path as strings, without the trailing ``value`` of an nnx Variable (saved or live)."""
    keys = tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
    return keys[:-1] if keys and keys[-1] == "value" else keys


def _prune(state, keep: set):
    """The ``nnx.State`` without the leaves whose path is not in ``keep``."""
    from flax import nnx

    return nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(state) if tuple(map(str, p)) in keep])


def read_config(path: str | Path, what: str = "") -> tuple[dict, Path]:
    """The resolved config saved with a checkpoint, and the step directory it came from."""
    def read(mngr, step):
        config = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        return config, Path(mngr.directory) / str(step)

    return _read(path, what, read)


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

    out = Path(workdir)
    ckpt_dir = empty_checkpoints_dir(out, what)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None and (Path(tokenizer_from) / "tokenizer.json").is_file():
        shutil.copy(Path(tokenizer_from) / "tokenizer.json", out / "tokenizer.json")
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str((out / "tokenizer.json").absolute())))
    _, params = nnx.split(model)
    mngr = manager(ckpt_dir, cfg.checkpoint)
    save(mngr, 0, {"params": params}, {}, to_dict(cfg), force=True)
    mngr.wait_until_finished()
    mngr.close()
    write_config(out, cfg)
    return ckpt_dir


def load_checkpoint_model(ckpt_path: str, mesh=None):
    """(config, params, graphdef) of a training checkpoint directory (latest step) or one step of it.

    Parameters are read straight into their shards on ``mesh`` (default: FSDP over every local
    device), so no device ever holds a whole large model."""
    import jax

    saved, step_dir = read_config(ckpt_path)
    cfg = from_dict(Config, saved)
    graphdef, like = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
    shardings = state_shardings(like, mesh or make_mesh(MeshConfig(data=1, fsdp=-1), jax.local_devices()))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), like, shardings)
    return cfg, restore_params(step_dir, target, what=""), graphdef


def write_config(workdir: Path, cfg: Config):
    import yaml

    if jax.process_index() != 0:
        return
    tmp = workdir / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, workdir / "config.yaml")

