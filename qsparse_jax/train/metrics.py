"""What a run reports: FLOPs per token (the one accounting, dense and sparse), progress, metrics.jsonl / tensorboard.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

from ..config import Config
from ..nn.model import activated_params, projection_params
from ..progress import duration, interactive
from .methods.base import TrainingMethod


def flops_per_token(cfg: Config, sparsity: dict[str, float] | None = None) -> float:
    """Training FLOPs per token: ``6·N`` for the matmuls plus attention ``12·L·T·H·d_h``. With
    per-projection ``sparsity``, the forward and weight-gradient matmuls only use kept inputs
    (``2·N_a`` each) while the input gradient stays dense under the STE (``2·N``)."""
    m = cfg.model
    n_proj = sum(projection_params(m).values())
    n_head = m.dim * m.vocab_size
    attn = 12 * m.n_layers * cfg.data.seq_len * m.n_heads * m.head_size / 2  # causal: half the scores
    if sparsity is None:
        return 6 * (n_proj + n_head) + attn
    n_a = activated_params(m, sparsity)["N_a"]
    return 4 * n_a + 2 * n_proj + 6 * n_head + attn


class Progress:
    """A progress bar with ETA on a terminal; plain lines (every log step) otherwise, e.g. in CI. The terminal
    test and the ETA's format are the shared ones of ``qsparse_jax/progress.py``; the lines come at log steps."""

    def __init__(self, total: int, start: int):
        self.total, self.start, self.t0 = total, start, time.time()
        self.tty = interactive()
        self.quiet = jax.process_index() != 0

    def update(self, step: int, text: str, force_line: bool = False):
        if self.quiet:
            return
        done = step - self.start
        rate = done / max(time.time() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        eta_s = duration(eta)
        if self.tty:
            width = 24
            fill = int(width * step / self.total)
            sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {step}/{self.total} {text} ETA {eta_s}  ")
            sys.stderr.flush()
            if force_line:
                sys.stderr.write("\n")
        elif force_line:
            print(f"step {step}/{self.total} {text} ETA {eta_s}", flush=True)

    def close(self):
        if self.tty:
            sys.stderr.write("\n")


class MetricsLog:
    """metrics.jsonl + tensorboardX, written by host 0 only, for a run going on from step ``start``.

    Each step is logged once: rows of steps after ``start`` that an earlier run logged (it was killed after
    logging them, before the checkpoint it resumes from had them saved) are dropped from metrics.jsonl, and
    tensorboard is told to purge its events from step ``start + 1`` on, as the resumed run logs them again."""

    def __init__(self, workdir: Path, start: int = 0):
        from tensorboardX import SummaryWriter

        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if jax.process_index() == 0:
            _drop_rows_after(self.path, start)
            self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start + 1)

    def write(self, step: int, metrics: dict):
        if self.tb is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
            elif isinstance(v, dict):
                for kk, vv in v.items():
                    self.tb.add_scalar(f"{k}/{kk}", vv, step)
        self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of ``path`` (metrics.jsonl) up to ``step``; a line cut short by a kill is dropped too."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def method_metrics(step_metrics: dict, methods: list[TrainingMethod], params, stats, n_tokens: int) -> dict:
    """The methods' step metrics as numbers (per-layer vectors as {overall, layer_i}) and their log metrics."""
    out: dict = {}
    for k, v in step_metrics.items():
        if k in ("loss", "grad_norm"):
            continue
        v = np.asarray(v)
        out[k] = float(v) if v.ndim == 0 else {"overall": float(v.mean()), **{f"layer_{i}": float(x) for i, x in enumerate(v)}}
    for m in methods:
        out.update(m.log_metrics(params, stats, n_tokens))
    return out

