"""The train state and the jitted steps: sharded (or abstract) init, train / eval / statistics steps.

The train step is one ``jax.jit`` with explicit in/out shardings and donated state, gradient
accumulation over micro-batches, and the methods' hooks (``train/methods``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import sys
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ..config import Config
from ..nn.model import Transformer, nll_sum
from ..nn.sharding import (
    activation_sharding,
    batch_sharding,
    check_batch,
    make_mesh,
    state_shardings,
    unsplit_dimensions,
)
from .methods import methods_for
from .methods.base import Context, TrainingMethod
from .optim import make_optimizer


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


_NOTED: set[str] = set()  # notes already printed (compile-only builds several variants of one config)


def note_once(text: str | None) -> None:
    if text and text not in _NOTED:
        _NOTED.add(text)
        print(text, file=sys.stderr, flush=True)


def check_mesh(cfg: Config, devices=None):
    """The mesh of ``cfg`` on ``devices`` (default: all), after checking that the batch divides over it
    and into ``optim.grad_accum`` micro-batches (one-line ``ConfigError`` naming the values that would)."""
    mesh = make_mesh(cfg.mesh, devices)
    check_batch(cfg.data.batch_size, mesh, cfg.optim.grad_accum)
    return mesh


def _build(cfg: Config, devices=None):
    """Mesh, graph, optimizer, methods, shardings and the jitted initializers (nothing allocated). A
    batch that does not divide over the mesh is a one-line ``ConfigError`` here, before any compile; a
    parameter dimension a mesh axis does not divide is noted once (it stays replicated along it)."""
    mesh = check_mesh(cfg, devices)
    model_fn = lambda: Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    graphdef, abstract_params = nnx.split(nnx.eval_shape(model_fn))
    note_once(unsplit_dimensions(abstract_params, mesh))
    methods = methods_for(cfg)
    optimizer = make_optimizer(cfg.optim, cfg.train.steps, no_decay=lambda p: _any_of([m.no_decay(p) for m in methods]))
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
    start_jit = jax.jit(start, in_shardings=(p_sharding,), out_shardings=shardings)

    def start_fn(params):  # the methods' host-side checks of loaded weights, then the jitted start
        for m in methods:
            params = m.before_start(params, mesh)
        return start_jit(params)

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


def _any_of(masks: list):
    """Leafwise OR of the methods' bool pytrees (``frozen``, ``no_decay``); None when none gave one."""
    masks = [f for f in masks if f is not None]
    return jax.tree.map(lambda *fs: functools.reduce(operator.or_, fs), *masks) if masks else None  # bools stay bools


def make_train_step(s: Setup, consts: dict | None = None):
    """The jitted step ``(state, batch) -> (state, metrics)``: loss = ``ce_weight·NLL + Σ method terms``
    over the counted targets, gradients of the ``nnx.Param`` leaves (accumulated over ``grad_accum``
    micro-batches), the methods' gradient adjustments and frozen parameters, the optimizer update, then
    the methods' scheduled refresh (``train/methods``). ``consts``: the methods' step constants (a teacher)."""
    accum = s.cfg.optim.grad_accum
    methods = s.methods
    need_stats = any(m.needs_stats for m in methods)
    hidden = {"return_hidden": True} if any(m.needs_hidden for m in methods) else {}
    ce_weight = math.prod(m.ce_weight for m in methods)
    consts = consts or {}

    def sum_fn(train_params, rest, batch, step_no, consts):
        # fresh Variables for the carried state, made at this trace level (nnx.remat writes state back to them)
        params = nnx.merge_state(train_params, jax.tree.map(lambda x: x, rest))
        inputs, targets, kw, weights = split_batch(batch)
        out = s.apply(params, inputs, return_stats=need_stats, **hidden, **kw)
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
        stop = _any_of([m.frozen(train_params) for m in methods])
        if stop is not None:  # frozen leaves: no gradient (not even in the clipping norm) and no update
            grads = jax.tree.map(lambda g, f: jnp.where(f, jnp.zeros_like(g), g), grads, stop)

        def after_clip(clipped):  # the methods' adjustments of the clipped gradients (AST's decay)
            for m in methods:
                clipped = m.adjust_clipped(clipped, params, step_no)
            return clipped

        updates, opt_state = s.optimizer.update(grads, state["opt_state"], train_params, after_clip=after_clip)
        if stop is not None:
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

