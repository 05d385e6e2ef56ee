"""The training system: exact resume, mesh independence, checkpoints across meshes, CLI errors."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from qsparse_jax.config import load_config
from qsparse_jax.train.loop import train
from qsparse_jax.testing.fixtures import cpu_env

ROOT = Path(__file__).resolve().parents[2]
QSPARSE = str(Path(sys.executable).with_name("qsparse"))  # the console script, as a user runs it
SMALL = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.hidden_dim=64", "model.max_seq_len=64",
         "data.seq_len=32", "data.batch_size=8", "train.steps=8", "train.log_every=1", "train.eval_every=4",
         "train.eval_batches=2", "checkpoint.every=0", "checkpoint.async_save=false", "optim.warmup_steps=2",
         "model.sparsity.qkv=0.3", "model.sparsity.out=0.3", "model.sparsity.gate_up=0.3", "model.sparsity.down=0.3"]


def losses(workdir):
    """``{step: loss}`` of a run's metrics.jsonl, where each step must be logged once: a run that re-logs steps
    (a resume that started over, or re-ran steps past its checkpoint and appended them) fails here rather than
    having its later rows overwrite the earlier ones in the dict."""
    steps = [r["step"] for r in map(json.loads, open(Path(workdir) / "metrics.jsonl"))]
    assert len(steps) == len(set(steps)), f"steps logged more than once in {workdir}/metrics.jsonl: {steps}"
    return {r["step"]: r["loss"] for r in map(json.loads, open(Path(workdir) / "metrics.jsonl"))}


def metric_lines(workdir):
    return (Path(workdir) / "metrics.jsonl").read_text().splitlines()


def run(corpus, workdir, *extra, **kw):
    return train(load_config(str(ROOT / "configs/tiny.yaml"), SMALL + [f"data.source={corpus}", *extra]), workdir, **kw)


@pytest.fixture(scope="module")
def straight_8(corpus, tmp_path_factory):
    """The losses of an uninterrupted 8-step run (SMALL's config): what every resumed 8-step run must reproduce."""
    work = tmp_path_factory.mktemp("straight")
    run(corpus, work)
    return losses(work)


def test_interrupted_and_resumed_run_reproduces_the_uninterrupted_losses(corpus, tmp_path, straight_8, capsys):
    stopped = run(corpus, tmp_path / "resumed", stop_after=3)
    assert stopped["stopped_at"] == 3
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["3"]
    first = metric_lines(tmp_path / "resumed")
    capsys.readouterr()
    run(corpus, tmp_path / "resumed")
    out = capsys.readouterr().out
    # it resumed: said so, ran steps 4..8 only, and left steps 1..3 as the first run logged them (their
    # tokens_per_s and host_fraction are timings: a run that started over would have rewritten them)
    assert f"resumed from step 3 in {tmp_path / 'resumed' / 'checkpoints'}" in out and "training steps 3..8 " in out
    assert metric_lines(tmp_path / "resumed")[:3] == first and len(first) == 3
    got = losses(tmp_path / "resumed")  # each step logged once
    assert sorted(got) == list(range(1, 9))
    assert [got[s] for s in range(1, 9)] == [straight_8[s] for s in range(1, 9)]  # exactly, data order included


MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    from qsparse_jax.config import load_config
    from qsparse_jax.train.loop import train
    cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
    train(cfg, sys.argv[3], stop_after=int(sys.argv[4]) if len(sys.argv) > 4 else None)
""")


def run_on_8_devices(corpus, workdir, overrides, stop_after=None):
    env = cpu_env(8)
    args = [sys.executable, "-c", MESH_SCRIPT, str(ROOT / "configs/tiny.yaml"),
            json.dumps(SMALL + [f"data.source={corpus}", "train.steps=4", *overrides]), str(workdir)]
    out = subprocess.run(args + ([str(stop_after)] if stop_after else []), env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("mesh, model", [
    (["mesh.data=1", "mesh.fsdp=8"], []),
    (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], ["model.scan_layers=true", "model.n_layers=2", "model.remat=full"]),
], ids=["fsdp8", "data2-fsdp2-tensor2-scan-remat"])
def test_sharded_meshes_give_the_single_device_losses(corpus, tmp_path, mesh, model):
    run(corpus, tmp_path / "one", "train.steps=4", *model)
    run_on_8_devices(corpus, tmp_path / "eight", mesh + model)
    one, eight = losses(tmp_path / "one"), losses(tmp_path / "eight")
    np.testing.assert_allclose([eight[s] for s in range(1, 5)], [one[s] for s in range(1, 5)], atol=1e-5)


def test_checkpoint_written_on_one_mesh_restores_on_another(corpus, tmp_path, capsys):
    run_on_8_devices(corpus, tmp_path / "run", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], stop_after=2)
    first = metric_lines(tmp_path / "run")
    assert len(first) == 2
    capsys.readouterr()
    run(corpus, tmp_path / "run", "train.steps=4")  # this process has one device
    out = capsys.readouterr().out
    assert "resumed from step 2 in " in out and "training steps 2..4 on 1 cpu device(s)" in out
    assert metric_lines(tmp_path / "run")[:2] == first  # steps 1-2 are the 8-device run's, not re-run here
    straight = tmp_path / "straight"
    run(corpus, straight, "train.steps=4")
    got, want = losses(tmp_path / "run"), losses(straight)
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in (1, 2, 3, 4)], [want[s] for s in (1, 2, 3, 4)], atol=1e-5)


def test_init_from_starts_a_new_run_from_checkpoint_parameters(corpus, tmp_path):
    run(corpus, tmp_path / "base", "train.steps=4")
    run(corpus, tmp_path / "cont", "train.steps=2", init_from=str(tmp_path / "base" / "checkpoints"))
    fresh = tmp_path / "fresh"
    run(corpus, fresh, "train.steps=2")
    assert losses(tmp_path / "cont")[1] < losses(fresh)[1]


def cli(*args, cwd=ROOT):
    return subprocess.run([QSPARSE, "train", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,msg", [
    (["model.bogus=1"], "unknown config key 'model.bogus'"),
    (["optim.lr=fast"], "optim.lr must be a float, got 'fast'"),
    (["model.sparsity.qkv=1.2"], r"model.sparsity.qkv must be a number in [0, 1), got 1.2"),
    (["model.sparsity.block_size=4096"], "model.sparsity.block_size=4096 must divide the qkv input size 256"),
    (["model.sparsity.down=0.9999"], "model.sparsity.down: sparsity 0.9999 keeps no entry out of 704"),
    (["data.source=/nonexistent/corpus"], "data.source: no such file or directory"),
    (["--init_from", "/nonexistent/ckpt"], "--init_from: no such checkpoint directory: /nonexistent/ckpt"),
])
def test_bad_inputs_exit_2_with_one_line(tmp_path, args, msg):
    out = cli("--config", "configs/tiny.yaml", "--workdir", str(tmp_path / "w"), *args)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0], out.stderr[-2000:]


def test_empty_data_directory_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    out = cli("--config", "configs/tiny.yaml", "--workdir", str(tmp_path / "w"), f"data.source={tmp_path / 'empty'}")
    assert out.returncode == 2 and out.stderr.strip() == f"error: data.source '{tmp_path / 'empty'}' holds no text"


def test_unreadable_checkpoint_directory_is_an_error(tmp_path):
    bad = tmp_path / "ckpt"
    (bad / "7").mkdir(parents=True)
    (bad / "7" / "garbage").write_text("not a checkpoint")
    out = cli("--config", "configs/tiny.yaml", "--workdir", str(tmp_path / "w"), "--init_from", str(bad))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "--init_from: " in out.stderr


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(corpus, tmp_path):
    from qsparse_jax.train.loop import TrainingError

    run(corpus, tmp_path / "w", "train.steps=2")
    with pytest.raises(TrainingError, match=r"non-finite loss \(\S+\) at step \d+") as e:
        run(corpus, tmp_path / "w", "train.steps=40", "optim.lr=1e12", "optim.clip_norm=null", "optim.warmup_steps=0")
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["2"]


def test_non_finite_stop_is_exact_when_losses_are_read_a_step_late(corpus, tmp_path):
    """The loop reads each loss one step late (no device sync per step); the stop still names the
    first bad step, as a run that reads every loss at once does, and saves nothing from it on."""
    import re

    from qsparse_jax.train.loop import TrainingError

    args = ["train.steps=40", "optim.lr=1e30", "optim.clip_norm=null", "optim.warmup_steps=30",
            "checkpoint.every=3", "checkpoint.keep=100"]
    bad = {}
    for log_every in (1, 100):  # 1: every loss read at once (log lines); 100: read one step late
        with pytest.raises(TrainingError) as e:
            run(corpus, tmp_path / f"w{log_every}", *args, f"train.log_every={log_every}")
        bad[log_every] = int(re.search(r"at step (\d+);", str(e.value)).group(1))
        saved = sorted(int(x) for x in os.listdir(tmp_path / f"w{log_every}" / "checkpoints"))
        assert saved and max(saved) == (bad[log_every] - 1) // 3 * 3
        assert f"the last saved checkpoint (step {max(saved)})" in str(e.value)
    assert bad[1] == bad[100] > 3


@pytest.fixture(scope="module")
def sft_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "x", "y"]
    lines = [json.dumps({"prompt": " ".join(rng.choice(words, 2)), "response": " ".join(rng.choice(words, 2))})
             for _ in range(200)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("task", ["lm", "sft"])
def test_two_processes_with_jax_distributed_match_one_process(task, corpus, sft_corpus, tmp_path):
    """Multi-host: two local processes (one CPU device each) joined by jax.distributed on 127.0.0.1
    train on a 2-device mesh, each feeding its half of every global batch (LM windows, or packed SFT
    rows with their segment ids and loss weights)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = [f"data.source={sft_corpus}", "data.task=sft", "data.seq_len=64"] if task == "sft" else []
    args = ["--config", "configs/tiny.yaml", "--workdir", str(tmp_path / "multi"), "--distributed",
            *SMALL, f"data.source={corpus}", "train.steps=3", "checkpoint.every=2", *data]
    procs = []
    for pid in range(2):
        env = cpu_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([QSPARSE, "train", *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    run(corpus, tmp_path / "single", "train.steps=3", *data)
    multi, single = losses(tmp_path / "multi"), losses(tmp_path / "single")
    np.testing.assert_allclose([multi[s] for s in (1, 2, 3)], [single[s] for s in (1, 2, 3)], atol=1e-5)
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["2", "3"]


def _start_training(corpus, workdir, *extra):
    args = ["--config", "configs/tiny.yaml", "--workdir", str(workdir), *SMALL, f"data.source={corpus}",
            "train.steps=100000", *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return subprocess.Popen([QSPARSE, "train", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, step: int):
    for line in proc.stdout:
        if line.startswith(f"step {step}/"):
            return
    raise AssertionError(proc.stderr.read()[-3000:])


def test_sigterm_saves_a_checkpoint_and_exits_0(corpus, tmp_path):
    import signal

    proc = _start_training(corpus, tmp_path / "w")
    _wait_for_step(proc, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    saved = [int(d) for d in os.listdir(tmp_path / "w" / "checkpoints") if d.isdigit()]
    assert len(saved) == 1 and saved[0] >= 3 and "saved a checkpoint" in out


# train, with the save of step sys.argv[4] held before its commit (orbax's rename of the temporary directory
# to the step's): the save stays uncommitted, its temporary directory on disk, until the process is killed
HELD_SAVE_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from orbax.checkpoint._src.path import atomicity
    from qsparse_jax.config import load_config
    from qsparse_jax.train.loop import train
    commit = atomicity.AtomicRenameTemporaryPath.finalize
    async def finalize(self):
        if self.get_final().name == sys.argv[4]:
            await asyncio.sleep(3600)
        return await commit(self)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    train(load_config(sys.argv[1], json.loads(sys.argv[2])), sys.argv[3])
""")


def test_a_kill_during_saves_never_damages_the_last_complete_checkpoint(corpus, tmp_path, straight_8, capsys):
    import signal
    import time

    work, saving = tmp_path / "w", ["checkpoint.every=1", "checkpoint.keep=2"]
    args = [sys.executable, "-c", HELD_SAVE_SCRIPT, str(ROOT / "configs/tiny.yaml"),
            json.dumps(SMALL + [f"data.source={corpus}", *saving, "checkpoint.async_save=true"]), str(work), "5"]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(args, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=log, stderr=log)
        deadline = time.time() + 600
        # step 6 logged (the loop then waits for the held save) while the save of step 5 is uncommitted
        while not ((tmp := list(work.glob("checkpoints/5.orbax-checkpoint-tmp*")))
                   and (work / "metrics.jsonl").exists() and len(metric_lines(work)) == 6):
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert all(p.exists() for p in tmp) and not (work / "checkpoints" / "5").exists()  # killed uncommitted
    committed = sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())
    assert committed and max(committed) == 4
    capsys.readouterr()
    # the run resumes from its latest committed checkpoint, step 4, and its losses are a straight run's
    run(corpus, work, *saving)
    assert f"resumed from step 4 in {work / 'checkpoints'}" in capsys.readouterr().out
    got = losses(work)  # each step logged once: steps the killed run logged past step 4 are not repeated
    assert sorted(got) == list(range(1, 9))
    # steps 1-4 from the killed process, 5-8 from this one: each equals the straight run's (to 1e-6, float32
    # rounding of a loss near 5.5 is 5e-7; one process's losses are bit-reproducible, as the test above checks)
    np.testing.assert_allclose([got[s] for s in range(1, 9)], [straight_8[s] for s in range(1, 9)], rtol=0, atol=1e-6)
    assert sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit()) == [7, 8]


def test_gradient_accumulation_matches_the_full_batch(corpus, tmp_path):
    run(corpus, tmp_path / "full", "train.steps=3")
    run(corpus, tmp_path / "accum", "train.steps=3", "optim.grad_accum=4")
    full, accum = losses(tmp_path / "full"), losses(tmp_path / "accum")
    np.testing.assert_allclose([accum[s] for s in (1, 2, 3)], [full[s] for s in (1, 2, 3)], rtol=1e-5)


def test_metrics_and_tensorboard_are_written(corpus, tmp_path):
    run(corpus, tmp_path / "w", "train.steps=4")
    rows = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mfu_sparse", "sparsity", "activated_params"):
        assert key in rows[-1]
    assert set(rows[-1]["sparsity"]) == {"qkv", "out", "up", "gate", "down", "overall"}
    assert rows[-1]["sparsity"]["qkv"] == pytest.approx(1 - int(0.7 * 32) / 32)
    assert "val_loss" in rows[3] and "val_bits_per_byte" in rows[3]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "w" / "tensorboard"))
    assert (tmp_path / "w" / "config.yaml").exists()
