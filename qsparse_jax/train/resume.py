"""Resuming a run: compare the saved config before any array is read, restore the newest intact step, say what changed.

``resume(cfg, checkpoints_dir, like_state)`` is what ``train`` calls before writing anything:

- the saved model config is compared with this run's first; a difference is one line naming each
  differing field with both values (``model.dim: 256 in the checkpoint, 128 now``). ``kernels``,
  ``remat`` and ``attention`` (how it computes, not what) may differ; keys added since the checkpoint
  was written take their defaults;
- a newest step that cannot be read (truncated, missing files) is passed over for the newest intact
  one (``checkpoints.native.restore_newest_intact``); :func:`announce` warns naming it, and ``train``
  sets it aside as ``N.unreadable`` once every input is checked;
- a changed ``train.steps`` (or optimizer setting) recomputes the learning-rate schedule for the new
  settings, as MaxText (``learning_rate_schedule_steps`` follows ``steps``) and Levanter (the schedule
  is built from ``num_train_steps`` on every start) do: one line says so, with the LR at the resume step
  before and after; any other changed setting is listed in one note.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from ..checkpoints import native as ckpt
from ..config import Config, ModelConfig, OptimConfig, from_dict, to_dict
from ..errors import ConfigError
from .optim import lr_schedule

COMPUTE_ONLY = {"kernels": "off", "remat": "none", "attention": "auto"}  # model keys that may change on resume


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_ABSENT = object()  # a key one side of a comparison lacks


def _show(v) -> str:
    return "(absent)" if v is _ABSENT else repr(v) if isinstance(v, str) else str(v)


def _changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    return [(k, old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(old.keys() | new.keys())
            if old.get(k, _ABSENT) != new.get(k, _ABSENT)]


def model_differences(saved: dict | None, model: ModelConfig) -> list[str]:
    """``["model.dim: 256 in the checkpoint, 128 now", ...]``: how a checkpoint's saved model config
    differs from ``model`` in what it computes; ``[]`` when it is the same model."""
    try:
        old = from_dict(ModelConfig, saved or {}, prefix="model.")
    except ConfigError as e:
        return [f"its saved model config does not load here ({e})"]
    a = _flat(to_dict(old.replace(**COMPUTE_ONLY)), "model.")
    b = _flat(to_dict(model.replace(**COMPUTE_ONLY)), "model.")
    return [f"{k}: {_show(x)} in the checkpoint, {_show(y)} now" for k, x, y in _changes(a, b)]


def _section(cls, saved: dict, name: str) -> dict:
    """A saved config section with the defaults of keys added since (as written when it cannot load)."""
    raw = saved.get(name) or {}
    try:
        return to_dict(from_dict(cls, raw, prefix=f"{name}."))
    except ConfigError:
        return raw


def schedule_change(saved: dict, cfg: Config, step: int) -> str | None:
    """One line when ``train.steps`` or an ``optim`` setting differs from the checkpoint's: the schedule
    is recomputed for the new settings, with the LR of step ``step`` (the next one run) before and after."""
    old_steps = (saved.get("train") or {}).get("steps")
    old_optim = _section(OptimConfig, saved, "optim")
    changed = [] if old_steps == cfg.train.steps else [f"train.steps {_show(old_steps)} -> {cfg.train.steps}"]
    changed += [f"optim.{k} {_show(x)} -> {_show(y)}" for k, x, y in _changes(_flat(old_optim), _flat(to_dict(cfg.optim)))]
    if not changed:
        return None
    new_lr = float(lr_schedule(cfg.optim, cfg.train.steps)(step))
    try:
        old_lr = float(lr_schedule(from_dict(OptimConfig, old_optim), int(old_steps))(step))
    except (ConfigError, TypeError, ValueError):
        old_lr = None
    if old_lr is None:
        lr = f"LR at step {step} is {new_lr:.3g}"
    elif abs(old_lr - new_lr) <= 1e-12 * max(abs(old_lr), 1.0):
        lr = f"LR at step {step} stays {new_lr:.3g}"
    else:
        lr = f"LR at step {step} changes from {old_lr:.3g} to {new_lr:.3g}"
    return (f"note: resuming at step {step} with {', '.join(changed)}: the learning-rate schedule is recomputed "
            f"for {cfg.train.steps} steps with the new settings; {lr}")


def other_changes(saved: dict, cfg: Config) -> str | None:
    """One note listing the settings, other than the schedule's, that differ from the checkpoint's."""
    old, new = {}, {}
    for name in (f.name for f in dataclasses.fields(Config) if f.name != "optim"):
        cls = type(getattr(cfg, name))
        old.update(_flat(_section(cls, saved, name), f"{name}."))
        new.update(_flat(to_dict(getattr(cfg, name)), f"{name}."))
    rows = [f"{k} {_show(x)} -> {_show(y)}" for k, x, y in _changes(old, new) if k != "train.steps"]
    return f"note: settings changed since the checkpoint, applied from here on: {', '.join(rows)}" if rows else None


def _model_check(cfg: Config, checkpoints: Path):
    def check(saved: dict):
        if diffs := model_differences(saved.get("model"), cfg.model):
            raise ckpt.CheckpointError(f"{checkpoints} holds a run with a different model config "
                                       f"({'; '.join(diffs)}); use a new --workdir, or set them back to resume it")

    return check


def check_saved_model(cfg: Config, checkpoints: str | Path) -> None:
    """Refuse a ``checkpoints`` directory whose newest readable config is another model's (one line),
    reading that config alone: ``train`` calls it first, before the data is read or the state built."""
    if (found := ckpt.newest_config(checkpoints)) is not None:
        _model_check(cfg, Path(checkpoints))(found[1])


def resume(cfg: Config, checkpoints: str | Path, like_state) -> ckpt.Restored | None:
    """The newest intact step of ``checkpoints`` restored like ``like_state`` (None when it holds no
    step); a different model is a one-line ``CheckpointError`` raised before any array is read."""
    checkpoints = Path(checkpoints)
    if not ckpt.saved_steps(checkpoints):
        return None
    return ckpt.restore_newest_intact(checkpoints, like_state, _model_check(cfg, checkpoints))


def announce(r: ckpt.Restored, cfg: Config, checkpoints: str | Path, moved: list[Path]) -> None:
    """The warning for passed-over steps and the notes on changed settings, on stderr."""
    if r.skipped:
        steps = "; ".join(f"step {s} is incomplete or corrupt ({why})" for s, why in r.skipped)
        where = ", ".join(str(p) for p in moved)
        print(f"warning: checkpoints in {checkpoints}: {steps}; set aside as {where}; resuming from step {r.step}, "
              "the newest intact one", file=sys.stderr, flush=True)
    for line in (schedule_change(r.config, cfg, r.step), other_changes(r.config, cfg)):
        if line:
            print(line, file=sys.stderr, flush=True)
