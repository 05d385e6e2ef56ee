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


def make_optimizer(o: OptimConfig, steps: int) -> optax.GradientTransformation:
    """AdamW (decay on matrices only, not norms or biases) after global-norm clipping."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(lr_schedule(o, steps), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=wd_schedule(o, steps),
                        mask=decay_mask)
    # always a chain, so the optimizer state keeps its structure (and resumes) whether clipping is on
    return optax.chain(optax.clip_by_global_norm(o.clip_norm if o.clip_norm else float("inf")), adamw)

