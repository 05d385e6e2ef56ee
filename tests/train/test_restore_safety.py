"""Restores, resume notices and input checks that come before anything is written (issue 19).

A damaged newest step falls back to the newest intact one with one warning; a different model config
is refused in one line before any array is read, with no traceback from orbax's threads at exit; a
batch that does not divide over the mesh is one line before anything compiles; a resume with more
steps says what happens to the learning-rate schedule; a run that fails on its inputs leaves its
workdir as it was.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from jax.sharding import AbstractMesh
from test_aot import needs_libtpu  # tests/train is on sys.path, as for test_resume_slices
from test_train import QSPARSE, ROOT, SMALL, run  # the corpus fixture is conftest's

from qsparse_jax.config import load_config
from qsparse_jax.errors import ConfigError
from qsparse_jax.nn.sharding import MESH_AXES, check_batch
from qsparse_jax.train.optim import lr_schedule
from qsparse_jax.testing.fixtures import cpu_env

# resumed runs stop after a step or two, before any log step: only the train step compiles
QUICK = ["checkpoint.every=2", "train.log_every=100", "train.eval_every=100"]


@pytest.fixture(scope="module")
def base_run(corpus, tmp_path_factory):
    """An 8-step run stopped after step 4, with checkpoints at steps 2 and 4 (copied by each test)."""
    workdir = tmp_path_factory.mktemp("base") / "w"
    run(corpus, workdir, "train.steps=8", *QUICK, stop_after=4)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    return workdir


def _copy(base: Path, tmp_path: Path) -> Path:
    shutil.copytree(base, tmp_path / "w")
    return tmp_path / "w"


def _truncate_arrays(step_dir: Path) -> None:
    """Cut every array data file of a step to 10 bytes, as a disk-full or interrupted copy leaves it."""
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(10)


def _cli(*args, env=None):
    env = cpu_env(**(env or {}))
    return subprocess.run([QSPARSE, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
                          check=False)


def test_a_truncated_newest_step_falls_back_to_the_newest_intact_one_with_one_warning(base_run, corpus, tmp_path,
                                                                                      capsys):
    w = _copy(base_run, tmp_path)
    _truncate_arrays(w / "checkpoints" / "4")
    capsys.readouterr()
    run(corpus, w, "train.steps=8", *QUICK, stop_after=3)
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, err
    assert "step 4 is incomplete or corrupt" in warnings[0] and "resuming from step 2" in warnings[0]
    assert "pybind11" not in err and "Traceback" not in err
    assert "note:" not in err  # the same settings: nothing changed, nothing to note
    assert "resumed from step 2" in out
    # the damaged step is set aside (not deleted), so the run can save step 4 again; it saved step 3
    assert sorted(os.listdir(w / "checkpoints")) == ["2", "3", "4.unreadable"]


def test_a_different_model_is_one_line_before_any_array_is_read(base_run, corpus, tmp_path):
    w = _copy(base_run, tmp_path)
    for step in ("2", "4"):  # no array of the checkpoint can be read: the config alone must decide
        _truncate_arrays(w / "checkpoints" / step)
    before = sorted(p.relative_to(w).as_posix() for p in w.rglob("*"))
    out = _cli("train", "--config", "configs/tiny.yaml", "--workdir", str(w), *SMALL, f"data.source={corpus}",
               "train.steps=12", "model.dim=64")
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr[-3000:]
    assert "different model config (model.dim: 32 in the checkpoint, 64 now)" in lines[0]
    assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr
    assert sorted(p.relative_to(w).as_posix() for p in w.rglob("*")) == before  # nothing written or moved


def test_a_resume_with_more_steps_says_the_schedule_is_recomputed(base_run, corpus, tmp_path, capsys):
    w = _copy(base_run, tmp_path)
    capsys.readouterr()
    run(corpus, w, "train.steps=12", *QUICK, stop_after=5)
    err = capsys.readouterr().err
    optim = load_config(str(ROOT / "configs/tiny.yaml"), SMALL).optim
    old, new = float(lr_schedule(optim, 8)(4)), float(lr_schedule(optim, 12)(4))
    assert old != new
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: resuming at step 4 with train.steps 8 -> 12: the learning-rate schedule is recomputed "
                     f"for 12 steps with the new settings; LR at step 4 changes from {old:.3g} to {new:.3g}"], err


@pytest.mark.parametrize("args", [
    ["train", "--workdir", "{w}", "--cpu_devices", "3"],
    ["compile", "--cpu_devices", "3"],
    pytest.param(["train", "--compile_only", "--topology", "v5p-128"], marks=[needs_libtpu, pytest.mark.libtpu]),
], ids=["train-3-devices", "compile-3-devices", "compile-v5p-128"])
def test_a_batch_that_does_not_divide_over_the_mesh_is_one_line(args, corpus, tmp_path):
    w = tmp_path / "w"
    out = _cli(*[a.format(w=w) for a in args], "--config", "configs/tiny.yaml", *SMALL, f"data.source={corpus}")
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.batch_size=8 does not divide over the "), out.stderr
    assert "use a multiple of" in lines[0] and "Traceback" not in out.stderr
    assert not w.exists()


def test_batch_messages_name_the_values_that_would_divide():
    mesh = lambda data, fsdp=1, tensor=1: AbstractMesh((data, fsdp, tensor), MESH_AXES)
    with pytest.raises(ConfigError) as e:
        check_batch(16, mesh(3))
    assert str(e.value) == ("data.batch_size=16 does not divide over the 3 data-parallel devices of mesh data=3 x "
                            "fsdp=1 x tensor=1: use a multiple of 3 (15 or 18), or mesh sizes whose data x fsdp is 1 "
                            "(mesh.tensor takes the other devices)")
    with pytest.raises(ConfigError, match=r"optim.grad_accum=3 equal micro-batches: use a multiple of 3 \(15 or 18\), "
                                          r"or optim.grad_accum=1, 2, 4, 8 or 16"):
        check_batch(16, mesh(1), grad_accum=3)
    check_batch(16, mesh(2, 4, 1), grad_accum=2)  # divides: nothing said


@pytest.mark.parametrize("extra, kw, msg", [
    (["model.weight_sparsity.n=2", "model.weight_sparsity.m=4", "train.distill.teacher=/nonexistent/teacher"], {},
     "train.distill.teacher: no such .*/nonexistent/teacher"),
    ([], {"init_from": "/nonexistent/ckpt"}, "--init_from: no such checkpoint directory: /nonexistent/ckpt"),
], ids=["ast-teacher", "init-from"])
def test_a_run_failing_on_its_inputs_leaves_the_workdir_untouched(corpus, tmp_path, extra, kw, msg):
    with pytest.raises(ConfigError, match=msg):
        run(corpus, tmp_path / "w", *extra, **kw)
    assert not (tmp_path / "w").exists()
