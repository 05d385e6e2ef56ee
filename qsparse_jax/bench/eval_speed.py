"""Evaluation speed: our eval and lm-eval with our backend against lm-eval's HF backend, in one run.

``qsparse bench eval [--items 60] [--out DIR]`` builds a tiny random HF Llama and 60 four-choice items
(240 log-likelihood requests, ``testing/fixtures.py``), then times each as a fresh process and prints
the ratios and compile counts. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..testing.fixtures import OFFLINE_ENV, make_llama, make_mc_items, write_mc_task
from .timing import machine


def _timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{out.stderr[-3000:]}")
    return wall, out.stdout + out.stderr


def bench_eval(args) -> int:
    """Wall time of our CLI, ``lm_eval --model qsparse_jax`` and ``lm_eval --model hf`` on the same model
    and 240 requests, each a fresh process (start-up included, as a user sees it)."""
    import tempfile

    work = Path(args.out or tempfile.mkdtemp(prefix="qsparse-eval-bench-"))
    model_dir, task_dir = work / "model", work / "tasks"
    if not (model_dir / "config.json").is_file():
        make_llama(model_dir)
    data = write_mc_task(task_dir, make_mc_items(args.items))
    env = {**os.environ, **OFFLINE_ENV, "HF_DATASETS_CACHE": str(work / "hf-datasets")}
    py = sys.executable
    lm = [py, "-m", "qsparse_jax", "lm-eval"]  # lm_eval's own CLI with our backend registered
    common = ["--tasks", "tiny_mc", "--include_path", str(task_dir), "--batch_size", str(args.batch_size)]
    runs = {
        "ours: eval CLI dense + sparse": [py, "-m", "qsparse_jax", "eval", "--hf", str(model_dir), "--mc", str(data),
                                          "--sparsity", "0.4", "--batch_size", str(args.batch_size), "--stats"],
        "ours: eval CLI dense": [py, "-m", "qsparse_jax", "eval", "--hf", str(model_dir), "--mc", str(data),
                                 "--batch_size", str(args.batch_size), "--stats"],
        "lm_eval --model qsparse_jax": lm + ["--model", "qsparse_jax", "--model_args", f"hf={model_dir}",
                                            "--output_path", str(work / "out-qsparse_jax")] + common,
        "lm_eval --model hf": lm + ["--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
                                   "--device", "cpu", "--output_path", str(work / "out-hf")] + common,
    }
    walls: dict[str, list[float]] = {k: [] for k in runs}
    logs = {}
    for _ in range(args.repeats):  # interleaved, so load from other jobs hits every run alike
        for name, cmd in runs.items():
            wall, logs[name] = _timed(cmd, env)
            walls[name].append(wall)
    best = {k: min(v) for k, v in walls.items()}
    ref = best["lm_eval --model hf"]
    print(f"{args.items * 4} loglikelihood requests ({args.items} four-choice items), batch size {args.batch_size}, "
          f"best of {args.repeats} interleaved runs, each a fresh process; {machine()}")
    print(f"{'run':<32} {'wall s':>8} {'/ lm_eval hf':>13}   all runs")
    for name, w in best.items():
        print(f"{name:<32} {w:>8.2f} {w / ref:>12.2f}x   {', '.join(f'{x:.2f}' for x in walls[name])}")
    for name in ("ours: eval CLI dense + sparse", "ours: eval CLI dense"):
        stats = [json.loads(line[len("stats: "):]) for line in logs[name].splitlines() if line.startswith("stats: ")]
        print(f"{name}: " + "; ".join(f"{s['column']} column {s['compiles']} compiles for {s['buckets']} bucket widths, "
                                      f"{s['compile_s']:.2f} s compiling, {s['score_s']:.2f} s in all" for s in stats))
    for tag in ("qsparse_jax", "hf"):
        res = sorted((work / f"out-{tag}").rglob("results_*.json"))
        if res:
            r = json.loads(res[-1].read_text())
            m = r["results"]["tiny_mc"]
            info = (f", {r['config']['qsparse_jax_compiles']} compiles" if "qsparse_jax_compiles" in r["config"] else "")
            print(f"lm_eval --model {tag}: acc {m['acc,none']:.4f}, acc_norm {m['acc_norm,none']:.4f}{info}")
    return 0

