"""The training loop: resume or start, run the jitted step, evaluate, log, checkpoint, stop cleanly.

``train(config, workdir)`` is what ``qsparse train`` / ``train.py`` calls. The state and the step are
``train/step.py``'s (one ``jax.jit`` with explicit in/out shardings from the parameters' logical axes;
the batch split over the data and fsdp mesh axes). Metrics go to ``workdir/metrics.jsonl`` (one JSON line
per logged step) and to tensorboardX event files under ``workdir/tensorboard`` (``train/metrics.py``).
Every input is checked before anything is written in ``workdir`` (a failing run leaves it as it was);
resuming (``train/resume.py``) compares the saved config first and restores the newest intact step.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np

from ..checkpoints import native as ckpt
from ..checkpoints.native import write_config
from ..config import Config, check_inputs, to_dict
from ..data.pipeline import batch_source, load_splits, train_dataset, val_batches
from ..errors import DataError
from ..nn.model import activated_params, sparsity_from_zeros
from .metrics import MetricsLog, Progress, flops_per_token, method_metrics
from .optim import lr_schedule
from .resume import announce, check_saved_model, model_differences, resume
from .step import check_mesh, make_eval_step, make_stats_step, make_train_step, setup
from .topology import peak_flops


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, ...); the message is one line."""


def evaluate(eval_fn, params, batches, sharding) -> float:
    """Mean NLL over every counted target of the batches."""
    sums = [eval_fn(params, _global_batch(b, sharding)) for b in batches]
    return float(sum(float(t) for t, _ in sums) / max(sum(float(n) for _, n in sums), 1.0))


def _global_batch(local, sharding):
    """This host's rows → global arrays split over the data axes (works single- and multi-host)."""
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), local)


class _StopRequest:
    """SIGTERM / SIGINT (preemption) set a flag; the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        import signal

        self.signal = None
        self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signal = signum

    def restore(self):
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _same_model(saved: dict | None, model) -> bool:
    """Whether a checkpoint's saved model config is this run's (``resume.model_differences`` is empty)."""
    return not model_differences(saved, model)


def train(cfg: Config, workdir: str | Path, init_from: str | None = None, stop_after: int | None = None) -> dict:
    """Train ``cfg`` in ``workdir``, resuming from its newest intact checkpoint if there is one; returns
    the final metrics. User-facing failures raise ConfigError / DataError / CheckpointError /
    TrainingError with one-line messages, and every input (data, teacher, ``--init_from``, the
    checkpoint's config, the batch against the mesh) is checked before anything is written in
    ``workdir``. ``stop_after`` simulates a preemption signal after that step."""

    workdir = Path(workdir)
    check_inputs(cfg)
    if init_from:
        ckpt.read_config(init_from, "--init_from: ")  # a missing or unreadable checkpoint: one line, now
    check_mesh(cfg)  # the batch against the mesh: one line now, not a sharding error in the first step
    check_saved_model(cfg, workdir / "checkpoints")  # a different model's run: refused before the data is read
    splits = load_splits(cfg.data)
    if splits.vocab_size > cfg.model.vocab_size:
        raise DataError(f"the tokenizer of data.source has {splits.vocab_size} tokens but model.vocab_size="
                        f"{cfg.model.vocab_size}")
    if cfg.train.epochs is not None:  # e.g. SFT recipes: "1 epoch"
        if splits.mixture is not None:
            raise DataError("train.epochs needs one data.source: a mixture has no epoch; set train.steps")
        rows = len(batch_source(splits.train, cfg.data.seq_len))
        steps = max(1, math.ceil(cfg.train.epochs * rows / cfg.data.batch_size))
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
        print(f"train.epochs={cfg.train.epochs:g} over {rows} rows of {cfg.data.seq_len + 1} tokens: {steps} steps",
              flush=True)
    if cfg.data.task == "sft":
        train_tokens = int(np.sum(splits.train["segment_ids"] > 0))
    elif splits.train_tokens is not None:
        train_tokens = splits.train_tokens
    else:
        train_tokens = len(splits.train)
    s, state = setup(cfg)  # a fresh sharded state: the restore target, or the start
    consts = {m.name: c for m in s.methods if (c := m.constants(s.mesh)) is not None}  # e.g. the teacher, read now
    batches = iter(train_dataset(splits.train, cfg.data))
    ckpt_dir = workdir / "checkpoints"
    restored = resume(cfg, ckpt_dir, state)  # the saved config is compared before any array is read
    if restored is not None:
        state = restored.state
        batches.set_state(restored.data)
        if init_from:
            print(f"note: --init_from {init_from} is not read: {workdir} holds a run, which resumes", file=sys.stderr,
                  flush=True)
    elif init_from:
        added = {name for m in s.methods for name in m.adds}
        params, missing = ckpt.restore_params(init_from, state["params"], allow_missing=True)
        if unknown := [p for p in missing if p.rsplit("/", 1)[-1] not in added]:
            hints = "".join(f"; {m.init_from_hint}" for m in s.methods if m.init_from_hint)
            allowed = f"only a method's own ({', '.join(sorted(added))}) may be missing" if added else "none may be missing"
            raise ckpt.CheckpointError(f"--init_from: {init_from} lacks {len(unknown)} parameters of this model "
                                       f"(e.g. {unknown[0]}); {allowed}{hints}")
        state = s.start(params)  # the methods prepare the loaded weights (AST masks, SLoRB) and restart their state
        kinds = collections.Counter(path.rsplit("/", 1)[-1] for path in missing)
        extra = (f" ({len(missing)} leaves not in the checkpoint kept as the methods made them: "
                 + ", ".join(f"{k} ×{n}" for k, n in sorted(kinds.items())) + ")") if missing else ""
        print(f"initialized parameters from {init_from}{extra}", flush=True)
    # every input is checked: from here on the run writes in workdir
    if restored is not None:
        announce(restored, cfg, ckpt_dir, ckpt.set_aside(ckpt_dir, [st for st, _ in restored.skipped]))
        print(f"resumed from step {restored.step} in {ckpt_dir}", flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    mngr = ckpt.manager(ckpt_dir, cfg.checkpoint)
    try:
        write_config(workdir, cfg)
        return _run(cfg, workdir, s, state, consts, splits, batches, mngr, train_tokens, stop_after)
    finally:
        mngr.close()  # waits for a save in flight: no orbax thread outlives the run


def _run(cfg, workdir, s, state, consts, splits, batches, mngr, train_tokens, stop_after) -> dict:
    """The steps from the state's own to ``train.steps``: log, evaluate, checkpoint, stop on a signal."""
    vals = {name: val_batches(v, cfg.data, cfg.train.eval_batches)
            for name, v in (splits.val_by_source or {"": splits.val}).items()}
    step_fn, eval_fn, stats_fn = make_train_step(s, consts), make_eval_step(s), make_stats_step(s)
    schedule = lr_schedule(cfg.optim, cfg.train.steps)
    start = int(state["step"])
    log = MetricsLog(workdir, start)  # steps after start logged by a run killed before saving them are dropped
    total = cfg.train.steps
    progress = Progress(total, start)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    peak = peak_flops(jax.devices()[0])
    n_dev = jax.device_count()
    what = "examples" if cfg.data.task == "sft" else "documents"
    print(f"training steps {start}..{total} on {n_dev} {jax.devices()[0].platform} device(s), mesh {dict(s.mesh.shape)}; "
          f"{splits.n_docs[0]} train / {splits.n_docs[1]} validation {what}, {train_tokens:,} train tokens", flush=True)
    last = {"time": time.time(), "step": start, "host": 0.0}
    metrics: dict = {}
    stop = _StopRequest()
    saved_step = start
    pending = None  # (step, metrics) dispatched but whose loss has not been read yet
    loss = float("nan")

    def checkpoint(step, force=False):
        nonlocal saved_step
        if step != saved_step or force:
            ckpt.save(mngr, step, state, batches.get_state(), to_dict(cfg), force=True)
            saved_step = step

    def read_loss(p) -> float:
        """The loss of a finished step; a non-finite one stops the run before anything after it is saved."""
        step_no, m = p
        value = float(m["loss"])
        if not math.isfinite(value):
            kept = (f"the last saved checkpoint (step {mngr.latest_step()}) is untouched"
                    if mngr.latest_step() is not None else "no checkpoint was written")
            raise TrainingError(f"non-finite loss ({value}) at step {step_no}; stopping (lower optim.lr or "
                                f"set optim.clip_norm); {kept}")
        return value

    try:
        for step in range(start, total):
            t_host = time.perf_counter()
            batch = _global_batch(next(batches), s.batch_sharding)
            state, m = step_fn(state, batch)  # dispatched: the device runs while the host goes on
            last["host"] += time.perf_counter() - t_host
            done = step + 1
            # read the previous step's loss, not this one's: the device is already busy with this step
            if pending is not None:
                loss = read_loss(pending)
            pending = (done, m)
            if done == stop_after:
                stop.signal = "simulated"
            stopping = stop.signal is not None  # read once: a signal arriving later waits for the next step
            logging = done % cfg.train.log_every == 0 or done == total
            saving = (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or stopping
            if logging or saving or done == total:  # these read or save this step's results: check it first
                loss, pending = read_loss(pending), None
            if logging:
                now = time.time()
                tps = (done - last["step"]) * tokens_per_step / max(now - last["time"], 1e-9)
                host_fraction = last["host"] / max(now - last["time"], 1e-9)
                last = {"time": now, "step": done, "host": 0.0}
                stats = stats_fn(state["params"], batch)
                sparsity = sparsity_from_zeros(cfg.model, stats, tokens_per_step)
                acct = activated_params(cfg.model, sparsity)
                achieved = tps * flops_per_token(cfg) / n_dev
                achieved_sparse = tps * flops_per_token(cfg, sparsity) / n_dev
                metrics = {"loss": loss, "lr": float(schedule(step)), "grad_norm": float(m["grad_norm"]),
                           "tokens_per_s": tps, "mfu": achieved / peak if peak else None,
                           "mfu_sparse": achieved_sparse / peak if peak else None,
                           "tflops_per_device": achieved / 1e12, "sparsity": {**sparsity, "overall": acct["overall"]},
                           "activated_params": acct["N_a"], "host_fraction": host_fraction,
                           **method_metrics(m, s.methods, state["params"], stats, tokens_per_step)}
                if splits.mixture is not None:
                    rows = splits.mixture.counts(done * cfg.data.batch_size)
                    metrics["tokens_by_source"] = {n: int(r) * cfg.data.seq_len for n, r in zip(splits.weights, rows)}
                if done % cfg.train.eval_every == 0 or done == total:
                    by_source = {n: evaluate(eval_fn, state["params"], b, s.batch_sharding) for n, b in vals.items()}
                    weights = splits.weights or {"": 1.0}
                    metrics["val_loss"] = sum(weights[n] * v for n, v in by_source.items())
                    if len(by_source) > 1:
                        metrics["val_loss_by_source"] = by_source
                    if cfg.data.tokenizer == "byte":
                        metrics["val_bits_per_byte"] = metrics["val_loss"] / math.log(2)
                log.write(done, metrics)
                text = f"loss {loss:.3f}" + (f" val {metrics['val_loss']:.3f}" if "val_loss" in metrics else "")
                progress.update(done, f"{text} {tps:,.0f} tok/s", force_line=True)
            else:
                progress.update(done, f"loss {loss:.3f}")
            if cfg.checkpoint.every and done % cfg.checkpoint.every == 0:
                checkpoint(done)
            if stopping:
                checkpoint(done)
                mngr.wait_until_finished()
                print(f"\nsignal {stop.signal}: saved a checkpoint at step {done}; resume with the same --workdir",
                      flush=True)
                return {**metrics, "stopped_at": done}
        checkpoint(total)
    finally:
        stop.restore()
        progress.close()
        log.close()
    return metrics

