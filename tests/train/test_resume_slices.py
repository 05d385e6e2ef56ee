"""Resuming on a slice of another size: a checkpoint written by 1 process × 8 devices resumes on
2 processes × 4 devices, and theirs back on 1 × 8, with the losses of a straight run on one device.

The two-process runs go through ``slurm/train.sbatch`` as a SLURM job would run them (a stand-in
``srun`` starts its tasks on this machine with ``SLURM_PROCID`` / ``SLURM_LOCALID``), so the script's
``jax.distributed`` set-up from SLURM's variables is exercised too. Each process simulates 4 CPU
devices; the mesh changes with the process count (data 2 × fsdp 4, then data 2 × fsdp 2 × tensor 2).
Each leg runs to a larger ``train.steps`` (train.py has no stop-after flag), so the learning-rate
schedule is one whose values do not depend on ``train.steps`` (constant after a 1-step warmup).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np

from test_train import ROOT, SMALL, losses, metric_lines, run, run_on_8_devices  # the corpus fixture is conftest's

from qsparse_jax.testing.fixtures import cpu_env

FAKE_SRUN = """#!/usr/bin/env bash
# stand-in for srun: start $SLURM_NTASKS tasks of the command here, one per "node"
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=0 "$@" > "$QSPARSE_TEST_LOGS/task$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo 127.0.0.1
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes_of_4(tmp_path, corpus, workdir, overrides):  # noqa: F811
    """``sbatch --nodes=2 slurm/train.sbatch -- ...`` on this machine: 2 processes × 4 CPU devices."""
    bin_dir, logs = tmp_path / "fake-slurm", tmp_path / f"logs-{len(list(tmp_path.glob('logs-*')))}"
    bin_dir.mkdir(exist_ok=True)
    logs.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node[1-2]", SLURM_NTASKS="2",
               SLURM_JOB_ID="1", SLURM_SUBMIT_DIR=str(ROOT), QSPARSE_TEST_LOGS=str(logs), JAX_PLATFORMS="cpu",
               XLA_FLAGS=cpu_env(4)["XLA_FLAGS"])
    args = ["bash", str(ROOT / "slurm/train.sbatch"), "--port", str(_free_port()), "--python", sys.executable, "--",
            "--config", "configs/tiny.yaml", "--workdir", str(workdir), *SMALL, f"data.source={corpus}", *overrides]
    p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    task_logs = "\n".join(f.read_text()[-2000:] for f in sorted(logs.glob("task*.log")))
    assert p.returncode == 0, p.stdout + p.stderr + task_logs
    assert "slurm: 2 processes (one per node) on node[1-2], coordinator 127.0.0.1:" in p.stdout
    log = (logs / "task0.log").read_text()
    assert "on 8 cpu device(s)" in log
    return log


# warmup 1 and constant: the learning rate at every step is the same whatever train.steps is
FIXED = ["optim.schedule=constant", "optim.warmup_steps=1", "train.eval_every=1000", "checkpoint.every=2"]
ONE_BY_8 = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
TWO_BY_4 = ["mesh.data=2", "mesh.fsdp=4"]


def test_checkpoint_moves_between_1x8_and_2x4_devices(corpus, tmp_path):  # noqa: F811
    """1 process x 8 devices writes step 2; 2 processes x 4 devices resume from it, train step 3 and save;
    1 x 8 resume from that and train step 4. Every loss equals a straight run on one device."""
    # the two 1 x 8 legs compile the same programs: the second reads them from the test session's persistent
    # compilation cache (tests/conftest.py)
    work, ref = tmp_path / "run", tmp_path / "one-device"
    run_on_8_devices(corpus, work, [*FIXED, "train.steps=2", *ONE_BY_8])
    first = metric_lines(work)
    log = run_two_processes_of_4(tmp_path, corpus, work, [*FIXED, "train.steps=3", *TWO_BY_4])
    assert "resumed from step 2" in log and "training steps 2..3 " in log
    assert sorted(os.listdir(work / "checkpoints")) == ["2", "3"]
    second = metric_lines(work)
    assert len(first) == 2 and second[:2] == first  # steps 1-2 as the 1 x 8 leg logged them: not re-run
    out = run_on_8_devices(corpus, work, [*FIXED, "train.steps=4", *ONE_BY_8])
    assert f"resumed from step 3 in {work / 'checkpoints'}" in out and "training steps 3..4 " in out
    assert sorted(os.listdir(work / "checkpoints")) == ["2", "3", "4"]
    assert len(second) == 3 and metric_lines(work)[:3] == second  # step 3 as the 2 x 4 leg logged it
    run(corpus, ref, *FIXED, "train.steps=4")  # straight through, in this process, on its one CPU device
    got, want = losses(work), losses(ref)  # losses(): each step logged once
    assert sorted(got) == [1, 2, 3, 4]
    # step 3 ran on 2 x 4 from the 1 x 8 checkpoint, step 4 on 1 x 8 from the 2 x 4 one; data order included.
    # 1e-5: the sharded reductions sum in another order than one device's (measured: at most 1e-6, 2 float32
    # ulps of a loss near 5.5); a leg that did not resume but trained from scratch is caught by the checks above
    np.testing.assert_allclose([got[s] for s in (1, 2, 3, 4)], [want[s] for s in (1, 2, 3, 4)], atol=1e-5)
