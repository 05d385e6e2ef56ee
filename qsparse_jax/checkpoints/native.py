"""Our checkpoint format, read and written in one place: orbax (async, sharded, atomic, keep-last-N) + config.

Training checkpoints (:func:`manager`, :func:`save`, :func:`restore_newest_intact`, which passes over
a damaged newest step for the one before it, and :func:`set_aside` for such steps), a model's parameters alone
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
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

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


@dataclasses.dataclass
class Restored:
    """What :func:`restore_newest_intact` read: the step, the train state, the data iterator's state, the
    saved config, and the newer steps it passed over as unreadable (``[(step, reason)]``)."""

    step: int
    state: object
    data: dict
    config: dict
    skipped: list[tuple[int, str]]


def _orphaned_read(u) -> bool:
    return isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed" and u.object is None


def _drop_orphaned_read_reports() -> None:
    """orbax gathers TensorStore reads in an event loop it closes when the first read fails; the reads
    still in flight finish later, and each reports ``RuntimeError: Event loop is closed`` as an
    unraisable exception (a traceback on stderr, at any moment up to exit) about a step already
    reported in one line. Called before reading a checkpoint: from then on those reports, and only those,
    are dropped; every other unraisable exception goes to the hook that was there."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_orphaned_reads", False):
        return

    def hook(u):
        if not _orphaned_read(u):
            previous(u)

    hook.drops_orphaned_reads = True
    sys.unraisablehook = hook


def _reason(e: BaseException) -> str:
    """An orbax / TensorStore error as a short clause (their messages run on for lines and quote C++ reprs)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if text.startswith("Encountered error while reading array"):
        return "truncated or corrupt array files"
    for cut in (" See full TensorStore details", "<bound method", "; Invalid argument"):
        text = text.split(cut)[0]
    return text.strip().strip("'\"").rstrip(".:;,")[:160] or type(e).__name__


def _open(directory: str | Path) -> ocp.CheckpointManager:
    """A checkpoint directory opened read-only (close it)."""
    _drop_orphaned_read_reports()
    return ocp.CheckpointManager(Path(directory).absolute(),
                                 options=ocp.CheckpointManagerOptions(read_only=True, create=False))


def _may_hold_steps(directory: str | Path) -> bool:
    """Whether ``directory`` has a step subdirectory (``N``). Every process of a multi-host run decides
    alike: process 0 may be creating the empty directory meanwhile, but steps appear only in a save,
    which all processes join; an orbax manager is opened (a collective) only where this is true."""
    d = Path(directory)
    return d.is_dir() and any(p.name.isdigit() and p.is_dir() for p in d.iterdir())


def saved_steps(directory: str | Path) -> list[int]:
    """The complete steps of a checkpoint directory, newest first ([] when it is absent or empty)."""
    if not _may_hold_steps(directory):
        return []
    mngr = _open(directory)
    try:
        return sorted(mngr.all_steps(), reverse=True)
    finally:
        mngr.close()


def newest_config(directory: str | Path) -> tuple[int, dict] | None:
    """``(step, saved config)`` of the newest step whose config reads (no array is read); None when none does."""
    if not _may_hold_steps(directory):
        return None
    mngr = _open(directory)
    try:
        for step in sorted(mngr.all_steps(), reverse=True):
            try:
                return step, mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
            except Exception:  # an unreadable step: restore_newest_intact names it
                continue
        return None
    finally:
        mngr.close()


def _metadata(item_dir: Path):
    """The saved tree's metadata (shapes, no arrays); the checkpointer is closed on every path."""
    _drop_orphaned_read_reports()
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        return checkpointer.metadata(item_dir)
    finally:
        checkpointer.close()


def _shapes(tree) -> dict[tuple, tuple]:
    return {_plain_path(p): tuple(getattr(v, "shape", ())) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def state_differences(step_dir: str | Path, like_state) -> list[str]:
    """How the train state saved in ``step_dir`` differs from ``like_state`` in leaves and shapes, read
    from its metadata alone (no array is read): ``[]`` when they match."""
    meta = _metadata(Path(step_dir) / "state")
    saved, mine = _shapes(getattr(meta, "item_metadata", meta)), _shapes(like_state)
    if not saved:  # orbax returns no tree (it only logs) when the metadata cannot be read
        raise CheckpointError(f"no readable state metadata in {step_dir}")
    name = lambda p: "/".join(p)
    out = [f"{name(p)} {saved[p]} saved, {mine[p]} now" for p in sorted(saved.keys() & mine.keys())
           if saved[p] != mine[p]]
    out += [f"{name(p)} only in the checkpoint" for p in sorted(saved.keys() - mine.keys())]
    out += [f"{name(p)} only in this run" for p in sorted(mine.keys() - saved.keys())]
    return out


def restore_newest_intact(directory: str | Path, like_state, check=None) -> Restored:
    """The newest step of ``directory`` that reads completely, laid out like ``like_state``.

    For each step, newest first: its saved config is read alone and given to ``check(config)`` (which
    raises to refuse the run: a different model) before any array is read; then the saved state's
    structure is compared with ``like_state`` from its metadata (a mismatch is a one-line
    CheckpointError, not a damaged step); then the arrays are read. A step whose files cannot be read
    (truncated, missing, corrupt) is passed over for the one before it and listed in ``skipped``. The
    directory is opened read-only and closed on every path."""
    directory = Path(directory)
    skipped: list[tuple[int, str]] = []
    mngr = _open(directory)
    try:
        for step in sorted(mngr.all_steps(), reverse=True):
            try:
                config = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
            except Exception as e:  # orbax raises many types for unreadable files
                skipped.append((step, f"its config cannot be read: {_reason(e)}"))
                continue
            if check is not None:
                check(config)
            try:
                diffs = state_differences(directory / str(step), like_state)
            except Exception as e:
                skipped.append((step, f"its state metadata cannot be read: {_reason(e)}"))
                continue
            if diffs:
                more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
                raise CheckpointError(f"step {step} in {directory} holds a different train state ({'; '.join(diffs[:3])}"
                                      f"{more}): was it written with another model, method or optimizer config? "
                                      "use a new --workdir")
            try:
                out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(like_state)),
                                                                 data=ocp.args.JsonRestore(),
                                                                 config=ocp.args.JsonRestore()))
            except Exception as e:
                skipped.append((step, f"its arrays cannot be read: {_reason(e)}"))
                continue
            return Restored(step, out["state"], out["data"], out["config"], skipped)
    finally:
        mngr.close()
    if not skipped:
        raise CheckpointError(f"no checkpoint in {directory}")
    listed = "; ".join(f"step {s}: {why}" for s, why in skipped)
    raise CheckpointError(f"no intact checkpoint in {directory} ({listed}); move them away to start over, or use a "
                          "new --workdir")


def set_aside(directory: str | Path, steps: list[int]) -> list[Path]:
    """Rename unreadable steps ``N`` to ``N.unreadable`` (``.unreadable.2``, ... when taken), so orbax
    no longer lists them and the run can save those steps again; nothing is deleted. Process 0 renames,
    every process waits for it. Returns the new paths."""
    directory, moved = Path(directory), []
    for step in steps:
        target, k = directory / f"{step}.unreadable", 1
        while target.exists():
            k += 1
            target = directory / f"{step}.unreadable.{k}"
        if jax.process_index() == 0:
            os.replace(directory / str(step), target)
        moved.append(target)
    if steps and jax.process_count() > 1:
        multihost_utils.sync_global_devices("qsparse: unreadable checkpoints set aside")
    return moved


def _read(path: str | Path, what: str, read):
    """Open a checkpoint directory (its latest step) or one step directory of it read-only and return
    ``read(manager, step)``; every failure is a one-line CheckpointError starting with ``what``."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{what}no such checkpoint directory: {path}")
    root, step = (p.parent, int(p.name)) if (p / "state").is_dir() and p.name.isdigit() else (p, None)
    mngr = None
    try:
        mngr = _open(root)
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{what}no checkpoint in {path}")
        return read(mngr, step)
    except CheckpointError:
        raise
    except Exception as e:  # orbax raises many types for unreadable directories
        earlier = [s for s in (mngr.all_steps() if mngr is not None else []) if step is None or s < step]
        hint = f"; the step before it may be intact: {root / str(max(earlier))}" if earlier else ""
        raise CheckpointError(f"{what}cannot read checkpoint {path}: {_reason(e)}{hint}") from None
    finally:
        if mngr is not None:
            mngr.close()


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
        meta = _metadata(Path(mngr.directory) / str(step) / "state")
        tree = getattr(meta, "item_metadata", meta)
        if not tree or "params" not in tree:  # orbax logs, and returns nothing, for unreadable metadata
            raise CheckpointError(f"{what}cannot read checkpoint {path}: step {step} holds no readable parameters")
        saved = tree["params"]
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
    try:
        save(mngr, 0, {"params": params}, {}, to_dict(cfg), force=True)
    finally:
        mngr.close()  # waits for the save
    write_config(out, cfg)
    return ckpt_dir


def load_checkpoint_model(ckpt_path: str, mesh=None):
    """(config, params, graphdef) of a training checkpoint directory (latest step) or one step of it.

    Parameters are read straight into their shards on ``mesh`` (default: FSDP over every local
    device), so no device ever holds a whole large model."""
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

