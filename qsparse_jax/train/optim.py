"""The optimizer: AdamW (optax) with the learning-rate and weight-decay schedules, clipping, masks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ..config import OptimConfig


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


def clip_then_adjust(clip_norm: float | None) -> optax.GradientTransformationExtraArgs:
    """Global-norm clipping (``clip_norm``; None or 0: none), then ``after_clip(grads)`` when the caller's
    ``update`` passes one (the methods' ``adjust_clipped``: AST's decay, added after clipping as the authors
    do). Its state is clipping's own, so the optimizer state keeps its structure (old checkpoints resume)."""
    clip = optax.clip_by_global_norm(clip_norm if clip_norm else float("inf"))

    def update(updates, state, params=None, *, after_clip=None, **extra):
        updates, state = clip.update(updates, state, params)
        return (updates if after_clip is None else after_clip(updates)), state

    return optax.GradientTransformationExtraArgs(clip.init, update)


def decay_mask(params, no_decay=None):
    """Which parameters AdamW decays: matrices (``ndim >= 2``; not norms or biases) that no method excludes
    (``no_decay(params)``: a pytree of bools, True = not decayed, e.g. LTE's routers)."""
    excluded = no_decay(params) if no_decay is not None else None
    if excluded is None:
        return jax.tree.map(lambda p: p.ndim >= 2, params)
    return jax.tree.map(lambda p, ex: p.ndim >= 2 and not ex, params, excluded)


def make_optimizer(o: OptimConfig, steps: int, no_decay=None) -> optax.GradientTransformation:
    """AdamW (decay on the :func:`decay_mask` parameters) after global-norm clipping (:func:`clip_then_adjust`).
    ``no_decay``: ``params -> pytree of bools`` (True: excluded from weight decay), the methods' ``no_decay``."""
    adamw = optax.adamw(lr_schedule(o, steps), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=wd_schedule(o, steps),
                        mask=lambda params: decay_mask(params, no_decay))
    # always a chain, so the optimizer state keeps its structure (and resumes) whether clipping is on
    return optax.chain(clip_then_adjust(o.clip_norm), adamw)
