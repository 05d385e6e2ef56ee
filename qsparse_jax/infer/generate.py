"""Timed decoding: the same weights generated sparse and dense, tokens/s of each (``qsparse generate``).

The prompt is prefilled in one pass, then one token per step is decoded inside a single jitted
``lax.scan`` (one dispatch for the whole continuation, so the timing is the model, not Python). The
same weights run twice, with the model's top-K sparsity and fully dense, and the tokens/s of both and
their ratio are printed (``--sparsity S`` sets a uniform sparsity for the sparse run). An LTE model
(``model.lte.enabled``) runs reading only the selected experts' weights (``lte.execution: gather``) vs
the same weights with a dense FFN, and the experts read per decode step (the batch's union) are printed.
"""

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

