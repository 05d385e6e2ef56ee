"""Data pipeline benchmark (issue 10): prepare throughput, time to first step and peak RSS vs corpus size.

    python benchmarks/data_pipeline.py [--work DIR] [--big_copies 34] [--repeats 2]

1. ``prepare`` throughput (MB of text per second) on the embedded stdlib corpus (~32 MB) with the
   byte tokenizer and with a byte-level BPE ``tokenizer.json`` (8k vocabulary, trained here on part
   of the corpus), 1 vs 2 worker processes.
2. Time from process start to the first finished training step, and the peak RSS of that process,
   for ``configs/tiny.yaml`` on a ~32 MB prepared corpus and on a ≥ 1 GB one (the stdlib repeated),
   alternating, and the ratio large / small (goal ≤ 1.2); the in-memory path (``data.source=stdlib``)
   for reference.
3. Host time per step (batch fetch + dispatch) as a fraction of the step time, from ``host_fraction``
   in metrics.jsonl of a 60-step tiny run.
Every figure is printed together with the ratio it is compared against.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sh_prepare(args: list[str]) -> float:
    """Run prepare in a fresh process; returns its MB/s from the summary it prints."""
    out = subprocess.run([sys.executable, "-m", "qsparse_jax", "prepare", *args], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    line = next(ln for ln in out.stdout.splitlines() if "MB of text ->" in ln)
    return float(line.split("(")[1].split(" MB/s")[0])


def train_bpe(path: Path, vocab: int = 8192) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from qsparse_jax.data.corpus import stdlib_files

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    files = [str(f) for f in stdlib_files()[::8]]
    tok.train(files, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return path


def first_step(source: str, workdir: Path) -> tuple[float, float]:
    """(seconds from process start to the first step's log line, peak RSS in MB) of a training process."""
    shutil.rmtree(workdir, ignore_errors=True)
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.yaml", "--workdir", str(workdir),
           f"data.source={source}", "train.steps=2", "train.log_every=1", "train.eval_every=1000",
           "checkpoint.every=0"]
    code = ("import resource, subprocess, sys, time; t = time.time(); "
            "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, text=True); first = None\n"
            "for line in p.stdout:\n"
            "    if first is None and line.startswith('step 1/'): first = time.time() - t\n"
            "p.wait(); assert p.returncode == 0, p.returncode\n"
            "print(first, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code, *cmd], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    t, rss = out.stdout.split()[-2:]
    return float(t), float(rss)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/qsparse-bench-data")
    p.add_argument("--big_copies", type=int, default=34, help="stdlib copies in the large corpus (34: ~1.07 GB)")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"cpus": os.cpu_count()}

    # 1. prepare throughput
    tok = train_bpe(work / "bpe8k.json")
    for name, spec in (("byte", "byte"), ("bpe8k", str(tok))):
        for w in (1, 2):
            out = work / f"prep-{name}-w{w}"
            shutil.rmtree(out, ignore_errors=True)
            res[f"prepare_{name}_w{w}_mb_s"] = sh_prepare(["--source", "stdlib", "--tokenizer", spec, "--out", str(out),
                                                           "--workers", str(w), "--chunk_mb", "4"])
            print(f"prepare {name} workers={w}: {res[f'prepare_{name}_w{w}_mb_s']:.1f} MB/s", flush=True)
        print(f"prepare {name}: 2 workers / 1 worker = "
              f"{res[f'prepare_{name}_w2_mb_s'] / res[f'prepare_{name}_w1_mb_s']:.2f}x", flush=True)

    # 2. time to first step and peak RSS, small vs large prepared corpus
    small, big = work / "prep-byte-w1", work / "prep-big"
    if not (big / "manifest.json").exists():
        t0 = time.time()
        sh_prepare(["--source", *["stdlib"] * a.big_copies, "--out", str(big), "--workers", "1"])
        print(f"prepared the large corpus in {time.time() - t0:.0f} s", flush=True)
    size = lambda d: json.loads((d / "manifest.json").read_text())["text_bytes"] / 1e6
    res["small_mb"], res["big_mb"] = size(small), size(big)
    runs: dict[str, list] = {"small": [], "big": [], "in_memory": []}
    for _ in range(a.repeats):
        for key, src in (("small", small), ("big", big), ("in_memory", "stdlib")):
            runs[key].append(first_step(str(src), work / f"run-{key}"))
            print(f"first step {key}: {runs[key][-1][0]:.1f} s, peak RSS {runs[key][-1][1]:.0f} MB", flush=True)
    for key, v in runs.items():
        res[f"{key}_first_step_s"] = min(t for t, _ in v)
        res[f"{key}_peak_rss_mb"] = max(r for _, r in v)
    res["first_step_ratio_big_small"] = res["big_first_step_s"] / res["small_first_step_s"]
    res["peak_rss_ratio_big_small"] = res["big_peak_rss_mb"] / res["small_peak_rss_mb"]
    print(f"{res['big_mb']:.0f} MB vs {res['small_mb']:.0f} MB prepared: time to first step ratio "
          f"{res['first_step_ratio_big_small']:.3f}, peak RSS ratio {res['peak_rss_ratio_big_small']:.3f}", flush=True)

    # 3. host time per step
    wd = work / "run-host"
    shutil.rmtree(wd, ignore_errors=True)
    subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml", "--workdir", str(wd),
                    f"data.source={big}", "train.steps=60", "train.log_every=20", "train.eval_every=1000",
                    "checkpoint.every=0"], cwd=ROOT, check=True, capture_output=True)
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    res["host_fraction"] = [round(r["host_fraction"], 4) for r in rows]
    res["tokens_per_s"] = [round(r["tokens_per_s"]) for r in rows]
    print(f"host time per step / step time (logging windows of 20 steps): {res['host_fraction']}", flush=True)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
