"""The README's workflow runs as written, in order, in an empty directory (issue 19).

Covered, run as written: the setup block's training line (``train.py --config configs/tiny.yaml --workdir
runs/tiny``), then the "Then, from the same directory" block (``eval --ckpt``, ``generate``, ``export-hf``,
``eval --hf``), then the AST section's block (``prune --method sparsegpt``, the ``configs/ast-tiny.yaml``
recipe with its teacher ``runs/tiny/checkpoints``, ``export-hf`` of the result). The directory holds only
what the commands name from the repository (``configs/``, ``train.py``, ``README.md``, as symbolic links),
so a command that needs anything else (an earlier run, the repository as working directory) fails here.

Added to the lines as written, and nothing else: a small model and few steps for training
(:data:`SMALL`, the same for the teacher and the AST student, whose checkpoint must load), one calibration
batch for ``prune``, four new tokens and one timed repeat for ``generate`` (``WORKFLOW``: one entry per
command, easy to adjust when a command changes). A README line that is missing or no longer matches its
pattern fails the test, naming it.

Only parsed (``tests/cli/test_readme_commands.py``): every other README line and the configs' recipe lines
(prepare, import-hf of real models, lm-eval, the LTE recipe, the 7B recipes, TPU / GPU compiles);
``qsparse compile ... --cpu_devices 8`` and ``scaling-law optimum`` are also run there.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qsparse_jax.config import ConfigError, check_inputs, load_config

ROOT = Path(__file__).resolve().parents[1]
QSPARSE = str(Path(sys.executable).with_name("qsparse"))
# what the commands read from the repository root; linked into the empty directory
REPO_FILES = ("configs", "train.py", "README.md")
# config overrides for every training line: a 1-layer model of width 64, two steps of 4 x 32 tokens
SMALL = ["model.n_layers=1", "model.dim=64", "model.n_heads=2", "model.hidden_dim=128", "data.seq_len=32",
         "data.batch_size=4", "train.steps=2", "train.log_every=1", "train.eval_batches=1"]
# (pattern of the README line, arguments added to it), in the order they run
WORKFLOW = [
    (r"^python train\.py --config configs/tiny\.yaml --workdir runs/tiny$", SMALL),  # the setup block's
    (r"^qsparse eval --ckpt runs/tiny/checkpoints --ppl README\.md$", []),
    (r"^qsparse generate --ckpt runs/tiny/checkpoints ", ["--max_new_tokens", "4", "--repeats", "1"]),
    (r"^qsparse export-hf runs/tiny/checkpoints runs/tiny-hf$", []),
    (r"^qsparse eval --hf runs/tiny-hf --ppl README\.md$", []),
    (r"^qsparse prune --method sparsegpt --ckpt runs/tiny/checkpoints --out runs/tiny-sgpt$", ["--calib_batches", "1"]),
    (r"^python train\.py --config configs/ast-tiny\.yaml --init_from runs/tiny/checkpoints --workdir runs/ast-tiny$",
     SMALL),
    (r"^qsparse export-hf runs/ast-tiny/checkpoints runs/ast-tiny-hf$", []),
]


def documented_lines() -> list[str]:
    """The README's bash-block lines, continuation lines joined and comments cut; the setup block's
    ``.venv/bin/python train.py ...`` (after ``&&``) as ``python train.py ...``."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            for part in re.sub(r"\s+#.*$", "", line).split("&&"):
                out.append(re.sub(r"^\.venv/bin/python ", "python ", part.strip()))
    return out


def argv_of(line: str) -> list[str]:
    words = shlex.split(line)
    return [QSPARSE, *words[1:]] if words[0] == "qsparse" else [sys.executable, *words[1:]]


def empty_repo_root(path: Path) -> Path:
    for name in REPO_FILES:
        (path / name).symlink_to(ROOT / name)
    return path


def run(argv: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _rows(stdout: str) -> dict:
    """``qsparse eval``'s last line: its rows as JSON."""
    return json.loads(stdout.strip().splitlines()[-1])


def test_the_readme_workflow_runs_as_written_in_an_empty_directory(tmp_path):
    lines = documented_lines()
    steps = []
    for pattern, extra in WORKFLOW:
        found = [line for line in lines if re.search(pattern, line)]
        assert found, f"the README has no line matching {pattern!r} (the workflow this test runs)"
        steps.append((found[0], extra))
    cwd = empty_repo_root(tmp_path)
    outputs, times = {}, []
    for line, extra in steps:
        t0 = time.perf_counter()
        out = run(argv_of(line) + list(extra), cwd)
        times.append(f"{time.perf_counter() - t0:.1f} s  {line}")
        assert out.returncode == 0, (f"{line} {' '.join(extra)} (in {cwd}): exit {out.returncode}\n"
                                     f"{out.stderr[-3000:]}\n" + "\n".join(times))
        outputs[line] = out
    print("\n".join(times))
    by = {pattern: outputs[line] for (pattern, _), (line, _) in zip(WORKFLOW, steps)}
    ckpt_eval, hf_eval = (_rows(by[WORKFLOW[i][0]].stdout) for i in (1, 4))
    assert set(ckpt_eval) == {"dense", "sparse (S=0.3)"}  # tiny.yaml's own 30 % top-K, side by side
    for col in ckpt_eval:  # the export holds the same model: the same numbers
        assert hf_eval[col]["perplexity"] == pytest.approx(ckpt_eval[col]["perplexity"], rel=1e-4)
    assert "sparse / dense decode speed" in by[WORKFLOW[2][0]].stdout
    assert (cwd / "runs/tiny-hf/config.json").is_file() and (cwd / "runs/ast-tiny-hf/config.json").is_file()
    assert (cwd / "runs/tiny-sgpt/checkpoints").is_dir()
    assert "initialized parameters from runs/tiny/checkpoints" in by[WORKFLOW[6][0]].stdout
    saved = load_config(str(cwd / "runs/ast-tiny/config.yaml"))
    assert saved.train.distill.teacher == "runs/tiny/checkpoints" and saved.model.weight_sparsity.n == 2


def test_a_recipe_whose_teacher_is_missing_fails_in_one_line_before_writing(tmp_path):
    """The AST recipe run where there is no ``runs/tiny``: one line naming the teacher's absolute path, exit
    status 2, and no ``runs/ast-tiny`` written."""
    line = next(line for line in documented_lines() if re.search(WORKFLOW[6][0], line))
    cwd = empty_repo_root(tmp_path)
    out = run(argv_of(line) + SMALL, cwd)
    assert out.returncode == 2, out.stderr[-3000:]
    err = [e for e in out.stderr.splitlines() if e.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), out.stderr
    assert f"no such file or directory {cwd / 'runs/tiny/checkpoints'}" in err[0], err[0]
    assert not (cwd / "runs").exists()


def test_check_inputs_names_every_missing_input_by_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(ROOT / "configs/ast-tiny.yaml"))
    with pytest.raises(ConfigError, match=re.escape(f"train.distill.teacher: no such file or directory "
                                                    f"{tmp_path / 'runs/tiny/checkpoints'} (runs/tiny/checkpoints "
                                                    "read from the current directory)")):
        check_inputs(cfg)
    (tmp_path / "runs/tiny/checkpoints").mkdir(parents=True)
    check_inputs(cfg)  # stdlib and the byte tokenizer are no paths
    with pytest.raises(ConfigError, match=re.escape(f"--init_from: no such file or directory {tmp_path / 'nope'}")):
        check_inputs(cfg, {"--init_from": "nope"})
    absent = str(tmp_path / "corpus")
    with pytest.raises(ConfigError, match=re.escape(f"data.source: no such file or directory {absent}") + "$"):
        check_inputs(load_config(None, [f"data.source={absent}"]))
    with pytest.raises(ConfigError, match=r"data\.mixture\[1\]\.source: .*/b \(b read from the current directory\)"):
        check_inputs(load_config(None, ["data.mixture=[{source: runs}, {source: b}]"]))
