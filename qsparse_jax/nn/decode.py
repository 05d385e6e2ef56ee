"""KV-cache decoding: the cache, prompt prefill and a whole continuation in one jitted ``lax.scan``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..config import ModelConfig
from ..errors import ConfigError
from .layers import _dtype


def _pick(logits, key, temperature):
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def make_generate(apply, config, batch: int, prompt_len: int, max_new_tokens: int, temperature: float = 0.0):
    """Jitted ``(prefill, decode)``: ``prefill(params, prompt, key) -> (first token, cache)``;
    ``decode(params, first, cache, key) -> tokens [batch, max_new_tokens]`` (the first included)."""
    max_len = prompt_len + max_new_tokens
    if max_len > config.max_seq_len:
        raise ConfigError(f"prompt ({prompt_len}) + new tokens ({max_new_tokens}) exceed model.max_seq_len "
                          f"{config.max_seq_len}")

    @jax.jit
    def prefill(params, prompt, key):
        logits, cache = apply(params, prompt, cache=init_cache(config, batch, max_len))
        return _pick(logits[:, -1], key, temperature), cache

    one = decode_step(apply, temperature)

    @jax.jit
    def decode(params, first, cache, key):
        def step(carry, k):
            nxt, cache = one(params, *carry, k)
            return (nxt, cache), nxt

        keys = jax.random.split(key, max_new_tokens - 1)
        _, rest = jax.lax.scan(step, (first, cache), keys)
        return jnp.concatenate([first[:, None], rest.T], axis=1)

    return prefill, decode


def decode_step(apply, temperature: float = 0.0):
    """One decode step, ``step(params, tok [batch], cache, key) -> (next token, cache)`` (not jitted): the
    body of ``make_generate``'s loop, and what ``train.aot`` compiles alone to cost one token."""

    def step(params, tok, cache, key):
        logits, cache = apply(params, tok[:, None], cache=cache)
        return _pick(logits[:, -1], key, temperature), cache

    return step


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None):
    """An empty KV cache: per layer ``k``, ``v`` zeros [batch, max_len, kv_heads, head_dim] and ``index`` 0
    (a list of per-layer dicts; with ``scan_layers`` one dict of arrays with a leading layer axis)."""
    dtype = dtype or _dtype(config.dtype)
    shape = (batch, max_len, config.kv_heads, config.head_size)
    layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.zeros((), jnp.int32)}
              for _ in range(config.n_layers)]
    return jax.tree.map(lambda *a: jnp.stack(a), *layers) if config.scan_layers else layers

