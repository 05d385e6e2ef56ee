"""Activation and weight quantizers of BitNet b1.58 / Q-Sparse, with straight-through gradients.

Transcribed from the PyTorch reference (BitNet "training tips", HF transformers' BitNet), float32
throughout, ``jnp.round`` = round half to even like ``torch.round``:

- activations, per token absmax int8 (Eq. 5–7):
  ``s = 127 / clamp(max|x|, 1e-5)``, ``y = clamp(round(x·s), −128, 127) / s``;
- weights, per tensor absmean ternary (Eq. 9–10):
  ``s = 1 / clamp(mean|w|, 1e-5)``, ``u = clamp(round(w·s), −1, 1) / s``;
- 1-bit weights (BitNet): ``sign(w − mean w) · mean|w|``.

The fake-quant functions return exactly the dequantized value in the forward pass (the reference's
``x + (q − x).detach()`` can differ from ``q`` by one rounding; ``custom_vjp`` does not) and pass the
cotangent through unchanged (STE).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

EPS = 1e-5
WEIGHT_BITS = ("1.58", "1")


def straight_through(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """``fn`` in the forward pass, identity in the backward pass."""

    @jax.custom_vjp
    def wrapped(x):
        return fn(x)

    wrapped.defvjp(lambda x: (fn(x), None), lambda _, g: (g,))
    return wrapped


def _activation_levels(x):
    x = x.astype(jnp.float32)
    s = 127.0 / jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), EPS)
    return jnp.clip(jnp.round(x * s), -128, 127), s


def _ternary_levels(w):
    w = w.astype(jnp.float32)
    s = 1.0 / jnp.maximum(jnp.mean(jnp.abs(w)), EPS)
    return jnp.clip(jnp.round(w * s), -1, 1), s


def _dequantize(levels, s, dtype):
    # XLA rewrites x / broadcast(s) into x * broadcast(1/s) and q / (127/m) into q * (m/127), each off
    # by an ulp from the reference; a full-shape divisor behind a barrier keeps the true division.
    s = lax.optimization_barrier(jnp.broadcast_to(s, levels.shape))
    return (levels / s).astype(dtype)


def activation_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token int8 values and scale ``s`` (float32, trailing axis kept): ``x ≈ values / s`` (Eq. 5–6)."""
    levels, s = _activation_levels(x)
    return levels.astype(jnp.int8), s


def ternary_weights(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Ternary int8 values in {−1, 0, 1} and per-tensor scale ``s = 1/mean|w|``: ``w ≈ values / s`` (Eq. 9–10)."""
    levels, s = _ternary_levels(w)
    return levels.astype(jnp.int8), s


def binary_weights(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """1-bit values ``sign(w − mean w)`` (int8) and ``alpha = mean|w|``: ``w ≈ values · alpha``."""
    w = w.astype(jnp.float32)
    return jnp.sign(w - jnp.mean(w)).astype(jnp.int8), jnp.mean(jnp.abs(w))


def _fake_activations(x):
    return _dequantize(*_activation_levels(x), x.dtype)


def _fake_ternary(w):
    return _dequantize(*_ternary_levels(w), w.dtype)


def _fake_binary(w):
    w32 = w.astype(jnp.float32)
    return (jnp.sign(w32 - jnp.mean(w32)) * jnp.mean(jnp.abs(w32))).astype(w.dtype)


quantize_activations = straight_through(_fake_activations)


quantize_activations.__doc__ = "Per-token absmax int8 fake quantization (Eq. 5–7), STE gradient."


_FAKE_WEIGHTS = {"1.58": straight_through(_fake_ternary), "1": straight_through(_fake_binary)}


def quantize_weights(w: jax.Array, bits: str = "1.58") -> jax.Array:
    """Ternary absmean (``bits="1.58"``, Eq. 9–10) or sign·mean|W| (``bits="1"``) fake quantization, STE."""
    if bits not in _FAKE_WEIGHTS:
        raise ValueError(f"weight bits must be one of {WEIGHT_BITS}, got {bits!r}")
    return _FAKE_WEIGHTS[bits](w)

