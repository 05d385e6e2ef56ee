"""The training loop: sharded init, one jitted step with donated state, evaluation, logging.

``train(config, workdir)`` is what ``train.py`` calls. The step is ``jax.jit`` with explicit in/out
shardings taken from the parameters' logical axes (``sharding.py``); the batch is split over the data
and fsdp mesh axes. Metrics go to ``workdir/metrics.jsonl`` (one JSON line per logged step) and to
tensorboardX event files under ``workdir/tensorboard``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from .config import Config, OptimConfig, to_dict
from .model import Transformer, activated_params, nll_sum, projection_params, sparsity_from_zeros
from .sharding import activation_sharding, batch_sharding, make_mesh, state_shardings
from .topology import peak_flops


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, ...); the message is one line."""


# --- optimizer -------------------------------------------------------------------------------------

def lr_schedule(o: OptimConfig, steps: int):
    """Linear warmup, then cosine / polynomial decay to ``end_lr_ratio · lr``, constant, or BitNet's
    two stages (``lr`` decaying until ``stage2_at``, then ``lr2`` decaying to ``end_lr_ratio · lr2``)."""
    warm = o.warmup_steps if o.warmup_fraction is None else round(o.warmup_fraction * steps)
    warm = min(warm, max(steps - 1, 0))

    def decay(peak, length):
        if o.schedule == "constant":
            return optax.constant_schedule(peak)
        if o.schedule == "polynomial":
            return optax.polynomial_schedule(peak, peak * o.end_lr_ratio, o.power, max(length, 1))
        return optax.cosine_decay_schedule(peak, max(length, 1), alpha=o.end_lr_ratio)

    if o.schedule == "two_stage":
        split = max(int(o.stage2_at * steps), warm + 1)
        first = optax.join_schedules([optax.linear_schedule(0.0, o.lr, warm), decay(o.lr, split - warm)], [warm])
        return optax.join_schedules([first, decay(o.lr2, steps - split)], [split])
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warm), decay(o.lr, steps - warm)], [warm])


def wd_schedule(o: OptimConfig, steps: int):
    if o.schedule != "two_stage":
        return o.weight_decay
    split = int(o.stage2_at * steps)
    return lambda step: jnp.where(step < split, o.weight_decay, o.weight_decay2)


def make_optimizer(o: OptimConfig, steps: int) -> optax.GradientTransformation:
    """AdamW (decay on matrices only, not norms or biases) after global-norm clipping."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(lr_schedule(o, steps), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=wd_schedule(o, steps),
                        mask=decay_mask)
    # always a chain, so the optimizer state keeps its structure (and resumes) whether clipping is on
    return optax.chain(optax.clip_by_global_norm(o.clip_norm if o.clip_norm else float("inf")), adamw)


# --- state and step --------------------------------------------------------------------------------

@dataclass
class Setup:
    cfg: Config
    mesh: Any
    graphdef: Any
    optimizer: optax.GradientTransformation
    state_sharding: Any
    batch_sharding: Any

    def apply(self, params, tokens, **kw):
        return nnx.merge(self.graphdef, params)(tokens, **kw)


def _build(cfg: Config, devices=None):
    """Mesh, graph, optimizer, parameter shardings and the jitted initializer (nothing allocated)."""
    mesh = make_mesh(cfg.mesh, devices)
    model_fn = lambda: Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    graphdef, abstract_params = nnx.split(nnx.eval_shape(model_fn))
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    p_sharding = state_shardings(abstract_params, mesh)

    def init():
        params = nnx.split(model_fn())[1]
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    # optimizer moments are sharded exactly like their parameters (left to XLA, they were replicated:
    # 2 × the model's float32 size on every device); counts and schedule states are replicated
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sharding = optax.tree_map_params(optimizer, lambda _, sh: sh, jax.eval_shape(optimizer.init, abstract_params),
                                         p_sharding, transform_non_params=lambda _: replicated,
                                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    shardings = {"params": p_sharding, "opt_state": opt_sharding, "step": replicated}
    return mesh, graphdef, optimizer, jax.jit(init, out_shardings=shardings), shardings


def setup(cfg: Config, devices=None) -> tuple[Setup, dict]:
    """Mesh, optimizer and a freshly initialized, sharded train state {params, opt_state, step}."""
    mesh, graphdef, optimizer, init_fn, shardings = _build(cfg, devices)
    return Setup(cfg, mesh, graphdef, optimizer, shardings, batch_sharding(mesh)), init_fn()


def abstract_setup(cfg: Config, devices=None) -> tuple[Setup, dict]:
    """As ``setup``, but the state is ``jax.ShapeDtypeStruct``s with their shardings: nothing is
    allocated, so ``devices`` may be a TPU slice described by libtpu (``topology.tpu_devices``)."""
    mesh, graphdef, optimizer, init_fn, shardings = _build(cfg, devices)
    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), jax.eval_shape(init_fn),
                         shardings)
    return Setup(cfg, mesh, graphdef, optimizer, shardings, batch_sharding(mesh)), state


def split_batch(batch):
    """(inputs, targets, model kwargs, target weights) of an LM batch [B, L+1] or a packed SFT batch
    dict (``tokens``, ``segment_ids``, ``positions``, ``weights``; see ``sft.py``)."""
    if isinstance(batch, dict):
        t = batch["tokens"]
        kw = {"positions": batch["positions"][:, :-1], "segment_ids": batch["segment_ids"][:, :-1]}
        return t[:, :-1], t[:, 1:], kw, batch["weights"]
    return batch[:, :-1], batch[:, 1:], {}, None


def _nll_sum(apply, params, batch):
    """(summed target NLL, number of targets counted) of one batch (``model.nll_sum``)."""
    inputs, targets, kw, weights = split_batch(batch)
    return nll_sum(apply(params, inputs, **kw), targets, weights)


def _under_mesh(mesh):
    """Trace ``fn`` with its activations constrained to ``mesh`` by logical axes (``sharding.constrain``)."""

    def wrap(fn):
        @functools.wraps(fn)
        def traced(*args):
            with activation_sharding(mesh):
                return fn(*args)

        return traced

    return wrap


def make_train_step(s: Setup):
    accum = s.cfg.optim.grad_accum

    def sum_fn(params, batch):
        return _nll_sum(s.apply, params, batch)

    @_under_mesh(s.mesh)
    def step(state, batch):
        params = state["params"]
        grad_fn = jax.value_and_grad(sum_fn, has_aux=True)
        if accum == 1:
            (total, count), grads = grad_fn(params, batch)
        else:  # accumulate summed losses and gradients: one optimizer update per global batch
            micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

            def body(carry, mb):
                (l, n), g = grad_fn(params, mb)
                return jax.tree.map(jnp.add, carry, (l, n, g)), None

            zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
            (total, count, grads), _ = jax.lax.scan(body, zeros, micro)
        count = jnp.maximum(count, 1.0)
        loss, grads = total / count, jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = s.optimizer.update(grads, state["opt_state"], params)
        new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": state["step"] + 1}
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, in_shardings=(s.state_sharding, s.batch_sharding),
                   out_shardings=(s.state_sharding, None), donate_argnums=(0,))


def make_eval_step(s: Setup):
    """(summed NLL, target count) of one batch."""

    @_under_mesh(s.mesh)
    def ev(params, batch):
        return _nll_sum(s.apply, params, batch)

    return jax.jit(ev, in_shardings=(s.state_sharding["params"], s.batch_sharding))


def make_stats_step(s: Setup):
    """Zeros seen at each projection group's input on one batch (for per-projection sparsity)."""

    @_under_mesh(s.mesh)
    def st(params, batch):
        inputs, _, kw, _ = split_batch(batch)
        return s.apply(params, inputs, return_stats=True, **kw)[1]

    return jax.jit(st, in_shardings=(s.state_sharding["params"], s.batch_sharding))


# --- FLOPs and MFU ---------------------------------------------------------------------------------

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


# --- logging ---------------------------------------------------------------------------------------

class Progress:
    """A progress bar with ETA on a terminal; plain lines (every log step) otherwise, e.g. in CI."""

    def __init__(self, total: int, start: int):
        self.total, self.start, self.t0 = total, start, time.time()
        self.tty = sys.stderr.isatty() and not os.environ.get("CI")
        self.quiet = jax.process_index() != 0

    def update(self, step: int, text: str, force_line: bool = False):
        if self.quiet:
            return
        done = step - self.start
        rate = done / max(time.time() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
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
    """metrics.jsonl + tensorboardX, written by host 0 only."""

    def __init__(self, workdir: Path):
        from tensorboardX import SummaryWriter

        self.path = workdir / "metrics.jsonl"
        self.tb = SummaryWriter(str(workdir / "tensorboard")) if jax.process_index() == 0 else None

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


def write_config(workdir: Path, cfg: Config):
    import yaml

    if jax.process_index() != 0:
        return
    tmp = workdir / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, workdir / "config.yaml")


# --- the loop --------------------------------------------------------------------------------------

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
    """Whether a checkpoint's saved model config is this run's: keys added since it was written take
    their defaults; ``kernels``, ``remat`` and ``attention`` (same parameters, same gradients) may differ."""
    from .config import ConfigError, ModelConfig, from_dict

    try:
        old = from_dict(ModelConfig, saved or {})
    except ConfigError:
        return False
    same = dict(kernels="off", remat="none", attention="auto")  # how it computes, not what
    return old.replace(**same) == model.replace(**same)


def train(cfg: Config, workdir: str | Path, init_from: str | None = None, stop_after: int | None = None) -> dict:
    """Train ``cfg`` in ``workdir``, resuming from its latest checkpoint if there is one; returns the
    final metrics. User-facing failures raise ConfigError / DataError / CheckpointError /
    TrainingError with one-line messages. ``stop_after`` simulates a preemption signal after that step."""
    from . import checkpoint as ckpt
    from .data import DataError, batch_source, load_splits, train_dataset, val_batches

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
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
    s, state = setup(cfg)
    batches = iter(train_dataset(splits.train, cfg.data))
    mngr = ckpt.manager(workdir / "checkpoints", cfg.checkpoint)
    if mngr.latest_step() is not None:
        state, data_state, saved = ckpt.restore(mngr, state)
        if not _same_model(saved.get("model"), cfg.model):
            raise ckpt.CheckpointError(f"{workdir} holds a run with a different model config; use a new --workdir")
        batches.set_state(data_state)
        print(f"resumed from step {int(state['step'])} in {workdir / 'checkpoints'}", flush=True)
    elif init_from:
        state["params"] = ckpt.restore_params(init_from, state["params"])
        print(f"initialized parameters from {init_from}", flush=True)
    write_config(workdir, cfg)
    vals = {name: val_batches(v, cfg.data, cfg.train.eval_batches)
            for name, v in (splits.val_by_source or {"": splits.val}).items()}
    step_fn, eval_fn, stats_fn = make_train_step(s), make_eval_step(s), make_stats_step(s)
    schedule = lr_schedule(cfg.optim, cfg.train.steps)
    log = MetricsLog(workdir)
    start = int(state["step"])
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
                sparsity = sparsity_from_zeros(cfg.model, stats_fn(state["params"], batch), tokens_per_step)
                acct = activated_params(cfg.model, sparsity)
                achieved = tps * flops_per_token(cfg) / n_dev
                achieved_sparse = tps * flops_per_token(cfg, sparsity) / n_dev
                metrics = {"loss": loss, "lr": float(schedule(step)), "grad_norm": float(m["grad_norm"]),
                           "tokens_per_s": tps, "mfu": achieved / peak if peak else None,
                           "mfu_sparse": achieved_sparse / peak if peak else None,
                           "tflops_per_device": achieved / 1e12, "sparsity": {**sparsity, "overall": acct["overall"]},
                           "activated_params": acct["N_a"], "host_fraction": host_fraction}
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
        mngr.wait_until_finished()
        mngr.close()
    return metrics
