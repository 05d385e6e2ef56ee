"""The training loop: sharded init, one jitted step with donated state, evaluation, logging.

``train(config, workdir)`` is what ``train.py`` calls. The step is ``jax.jit`` with explicit in/out
shardings taken from the parameters' logical axes (``sharding.py``); the batch is split over the data
and fsdp mesh axes. Metrics go to ``workdir/metrics.jsonl`` (one JSON line per logged step) and to
tensorboardX event files under ``workdir/tensorboard``.
"""

from __future__ import annotations

import collections
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
from .methods import Context, TrainingMethod, methods_for
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
    methods: list[TrainingMethod] = dataclasses.field(default_factory=list)
    start: Any = None  # jitted params -> fresh train state (methods prepared), e.g. after --init_from

    def apply(self, params, tokens, **kw):
        return nnx.merge(self.graphdef, params)(tokens, **kw)


def trainable(params):
    """(the ``nnx.Param`` leaves: differentiated and optimized, everything else: carried model state)."""
    return nnx.split_state(params, nnx.Param, ...)


def _build(cfg: Config, devices=None):
    """Mesh, graph, optimizer, methods, shardings and the jitted initializers (nothing allocated)."""
    mesh = make_mesh(cfg.mesh, devices)
    model_fn = lambda: Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    graphdef, abstract_params = nnx.split(nnx.eval_shape(model_fn))
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    methods = methods_for(cfg)
    p_sharding = state_shardings(abstract_params, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())

    def start(params):
        for m in methods:
            params = m.prepare(params)
        state = {"params": params, "opt_state": optimizer.init(trainable(params)[0]), "step": jnp.zeros((), jnp.int32)}
        mstates = {m.name: m.init_state(params) for m in methods}
        if any(v is not None for v in mstates.values()):
            state["methods"] = {k: v for k, v in mstates.items() if v is not None}
        return state

    # optimizer moments are sharded exactly like their parameters (left to XLA, they were replicated:
    # 2 × the model's float32 size on every device); counts and schedule states are replicated
    opt_sharding = optax.tree_map_params(optimizer, lambda _, sh: sh,
                                         jax.eval_shape(optimizer.init, trainable(abstract_params)[0]),
                                         trainable(p_sharding)[0], transform_non_params=lambda _: replicated,
                                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    shardings = {"params": p_sharding, "opt_state": opt_sharding, "step": replicated}
    m_sharding = {m.name: m.state_shardings(p_sharding, replicated) for m in methods}
    if any(v is not None for v in m_sharding.values()):
        shardings["methods"] = {k: v for k, v in m_sharding.items() if v is not None}
    start_fn = jax.jit(start, in_shardings=(p_sharding,), out_shardings=shardings)
    init_fn = jax.jit(lambda: start(nnx.split(model_fn())[1]), out_shardings=shardings)
    return mesh, graphdef, optimizer, init_fn, shardings, methods, start_fn


def setup(cfg: Config, devices=None) -> tuple[Setup, dict]:
    """Mesh, optimizer and a freshly initialized, sharded train state {params, opt_state, step[, methods]}."""
    mesh, graphdef, optimizer, init_fn, shardings, methods, start_fn = _build(cfg, devices)
    return Setup(cfg, mesh, graphdef, optimizer, shardings, batch_sharding(mesh), methods, start_fn), init_fn()


def abstract_setup(cfg: Config, devices=None) -> tuple[Setup, dict]:
    """As ``setup``, but the state is ``jax.ShapeDtypeStruct``s with their shardings: nothing is
    allocated, so ``devices`` may be a TPU slice described by libtpu (``topology.tpu_devices``)."""
    mesh, graphdef, optimizer, init_fn, shardings, methods, start_fn = _build(cfg, devices)
    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), jax.eval_shape(init_fn),
                         shardings)
    return Setup(cfg, mesh, graphdef, optimizer, shardings, batch_sharding(mesh), methods, start_fn), state


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


def make_train_step(s: Setup, consts: dict | None = None):
    """The jitted step ``(state, batch) -> (state, metrics)``: loss = ``ce_weight·NLL + Σ method terms``
    over the counted targets, gradients of the ``nnx.Param`` leaves (accumulated over ``grad_accum``
    micro-batches), the methods' gradient adjustments and frozen parameters, the optimizer update, then
    the methods' scheduled refresh (``methods.py``). ``consts``: the methods' step constants (a teacher)."""
    accum = s.cfg.optim.grad_accum
    methods = s.methods
    need_stats = any(m.needs_stats for m in methods)
    ce_weight = math.prod(m.ce_weight for m in methods)
    consts = consts or {}

    def sum_fn(train_params, rest, batch, step_no, consts):
        # fresh Variables for the carried state, made at this trace level (nnx.remat writes state back to them)
        params = nnx.merge_state(train_params, jax.tree.map(lambda x: x, rest))
        inputs, targets, kw, weights = split_batch(batch)
        out = s.apply(params, inputs, return_stats=need_stats, **kw)
        logits, stats = out if need_stats else (out, None)
        nll, count = nll_sum(logits, targets, weights)
        ctx = Context(logits, stats, inputs, targets, weights, kw, step_no)
        terms = {}
        for m in methods:
            terms.update(m.loss_terms(ctx, consts.get(m.name)))
        total = ce_weight * nll + sum(terms.values(), jnp.zeros(()))
        return total, (count, {"ce": nll, **terms})

    @_under_mesh(s.mesh)
    def step(state, batch, consts):
        params, step_no = state["params"], state["step"]
        train_params, rest = trainable(params)
        grad_fn = jax.value_and_grad(sum_fn, has_aux=True)
        if accum == 1:
            (total, (count, parts)), grads = grad_fn(train_params, rest, batch, step_no, consts)
        else:  # accumulate summed losses and gradients: one optimizer update per global batch
            micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

            def body(carry, mb):
                (l, (n, p)), g = grad_fn(train_params, rest, mb, step_no, consts)
                return jax.tree.map(jnp.add, carry, (l, n, p, g)), None

            parts0 = jax.eval_shape(lambda: grad_fn(train_params, rest, jax.tree.map(lambda x: x[0], micro), step_no,
                                                    consts)[0][1][1])
            zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), parts0),
                     jax.tree.map(jnp.zeros_like, train_params))
            (total, count, parts, grads), _ = jax.lax.scan(body, zeros, micro)
        count = jnp.maximum(count, 1.0)
        loss, grads = total / count, jax.tree.map(lambda g: g / count, grads)
        for m in methods:
            grads = m.adjust_grads(grads, params, step_no)
        frozen = [f for f in (m.frozen(train_params) for m in methods) if f is not None]
        if frozen:  # frozen leaves: no gradient (not even in the clipping norm) and no update
            stop = jax.tree.map(lambda *fs: functools.reduce(jnp.logical_or, fs), *frozen)
            grads = jax.tree.map(lambda g, f: jnp.where(f, jnp.zeros_like(g), g), grads, stop)
        updates, opt_state = s.optimizer.update(grads, state["opt_state"], train_params)
        if frozen:
            updates = jax.tree.map(lambda u, f: jnp.where(f, jnp.zeros_like(u), u), updates, stop)
        params = nnx.merge_state(optax.apply_updates(train_params, updates), rest)
        mstates = dict(state.get("methods", {}))
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        for m in methods:
            params, ms = m.refresh(params, mstates.get(m.name), step_no)
            if ms is not None:
                mstates[m.name] = ms
            metrics.update(m.step_metrics(params, mstates.get(m.name)))
        if methods:
            metrics.update({k: v / count for k, v in parts.items()})
        new = {"params": params, "opt_state": opt_state, "step": step_no + 1}
        if mstates:
            new["methods"] = mstates
        return new, metrics

    if consts:  # constants keep their own (mesh) shardings and are never donated
        jitted = jax.jit(step, in_shardings=(s.state_sharding, s.batch_sharding, None),
                         out_shardings=(s.state_sharding, None), donate_argnums=(0,))
        return _WithConstants(jitted, consts)
    return jax.jit(lambda state, batch: step(state, batch, {}), in_shardings=(s.state_sharding, s.batch_sharding),
                   out_shardings=(s.state_sharding, None), donate_argnums=(0,))


class _WithConstants:
    """A jitted ``step(state, batch, consts)`` called as ``step(state, batch)`` (also ``.lower``)."""

    def __init__(self, jitted, consts):
        self.jitted, self.consts = jitted, consts

    def __call__(self, state, batch):
        return self.jitted(state, batch, self.consts)

    def lower(self, state, batch):
        return self.jitted.lower(state, batch, self.consts)


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
    write_config(workdir, cfg)
    vals = {name: val_batches(v, cfg.data, cfg.train.eval_batches)
            for name, v in (splits.val_by_source or {"": splits.val}).items()}
    consts = {m.name: c for m in s.methods if (c := m.constants(s.mesh)) is not None}
    step_fn, eval_fn, stats_fn = make_train_step(s, consts), make_eval_step(s), make_stats_step(s)
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
        mngr.wait_until_finished()
        mngr.close()
    return metrics
