"""TODO docstring (generate)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError
from ..nn.decode import make_generate


def generate(apply, params, config, prompt: np.ndarray, max_new_tokens: int, *, temperature: float = 0.0,
             seed: int = 0, repeats: int = 1) -> tuple[np.ndarray, dict]:
    """Continue ``prompt`` (int [batch, P]) by ``max_new_tokens``; returns (tokens, timings). Timings are
    medians over ``repeats`` runs after a compile run: ``prefill_s``, ``decode_s``, ``tokens_per_s``
    (decoded tokens of the whole batch per second)."""
    if max_new_tokens < 2:
        raise ConfigError(f"--max-new-tokens must be at least 2, got {max_new_tokens}")
    prompt = jnp.asarray(prompt, jnp.int32)
    b, plen = prompt.shape
    prefill, decode = make_generate(apply, config, b, plen, max_new_tokens, temperature)
    k1, k2 = jax.random.split(jax.random.key(seed))
    pre, dec = [], []
    for _ in range(repeats + 1):  # the first run compiles
        t0 = time.perf_counter()
        first, cache = jax.block_until_ready(prefill(params, prompt, k1))
        t1 = time.perf_counter()
        out = jax.block_until_ready(decode(params, first, cache, k2))
        t2 = time.perf_counter()
        pre.append(t1 - t0)
        dec.append(t2 - t1)
    decode_s = float(np.median(dec[1:]))
    return np.asarray(out), {"prefill_s": float(np.median(pre[1:])), "decode_s": decode_s,
                             "tokens_per_s": b * (max_new_tokens - 1) / decode_s}

