"""Timed decoding: the same weights generated sparse and dense, tokens/s of each (``qsparse generate``).

The prompt is prefilled in one pass, then one token per step is decoded inside a single jitted
``lax.scan`` (one dispatch for the whole continuation, so the timing is the model, not Python). The
same weights run twice, with the model's top-K sparsity and fully dense, and the tokens/s of both and
their ratio are printed (``--sparsity S`` sets the sparse run's top-K sparsity; the model's block size,
rescale and gradient are kept: ``variants.sparsity_config``). An LTE model
(``model.lte.enabled``) runs reading only the selected experts' weights (``lte.execution: gather``) vs
the same weights with a dense FFN, and the experts read per decode step (the batch's union) are printed.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..config import Config, SparsityConfig
from ..errors import ConfigError
from ..nn.decode import make_generate
from ..nn.model import functional
from ..train.aot import decode_report
from .variants import dense_variant, sparsity_config, variant, with_execution


def generate(apply, params, config, prompt: np.ndarray, max_new_tokens: int, *, temperature: float = 0.0,
             seed: int = 0, repeats: int = 1) -> tuple[np.ndarray, dict]:
    """Continue ``prompt`` (int [batch, P]) by ``max_new_tokens``; returns (tokens, timings). Timings are
    medians over ``repeats`` runs after a compile run: ``prefill_s``, ``decode_s``, ``tokens_per_s``
    (decoded tokens of the whole batch per second)."""
    if max_new_tokens < 2:
        raise ConfigError(f"--max_new_tokens must be at least 2, got {max_new_tokens}")
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



@dataclasses.dataclass
class DecodeRun:
    """One timed run of :func:`decode_runs`: the tokens, the timings, and the sparsity it ran with."""

    tokens: np.ndarray
    timings: dict
    sparsity: SparsityConfig


def decode_runs(model, prompt: np.ndarray, max_new_tokens: int, *, kernels: str = "off", bits: float = 2,
                temperature: float = 0.0, repeats: int = 1, sparsity: float | None = None,
                block_size: int | None = None, **groups: float | None) -> dict[str, DecodeRun]:
    """``qsparse generate``'s runs of one model: ``{"sparse", "dense"}`` (``"dense"`` only when the model
    and the options are dense), or for an LTE model ``{"lte", "dense"}`` (selected experts read vs the
    same weights with a dense FFN). The sparse run's config is ``sparsity_config(sparsity, default=the
    model's own, block_size=..., **groups)``: unset options keep the model's block size, rescale and
    gradient, so a Block Q-Sparse model decodes with its N:M blocks."""
    if repeats < 1:
        raise ConfigError(f"--repeats must be positive, got {repeats}")
    prompt = np.asarray(prompt, np.int32)
    if prompt.ndim != 2 or prompt.shape[0] < 1 or prompt.shape[1] < 1:
        raise ConfigError("the prompt is empty after tokenization (or --batch is not positive)")
    given = sparsity is not None or block_size is not None or any(v is not None for v in groups.values())
    sparse = sparsity_config(sparsity, default=model.config.sparsity, block_size=block_size, **groups)
    if model.config.lte.enabled:  # LTE: only the selected experts (gather) vs the same weights, dense FFN
        if kernels != "off" or given:
            raise ConfigError("an LTE model decodes with its own sparsity and kernels off (no --kernels, --sparsity)")
        variants = {"lte": functional(with_execution(model, "gather")), "dense": functional(dense_variant(model))}
        plan = {name: (v, sparse) for name, v in variants.items()}
    else:
        plan = {"sparse": (None, sparse)} if sparse.enabled else {}
        plan["dense"] = (None, SparsityConfig())
        # validates S and the kernels against the model; packs the ternary weights once per run
        plan = {name: (variant(model, sp, kernels, bits), sp) for name, (_, sp) in plan.items()}
    runs = {}
    for name, ((apply, params), sp) in plan.items():
        out, t = generate(apply, params, apply.config, prompt, max_new_tokens, temperature=temperature,
                          repeats=repeats)
        runs[name] = DecodeRun(out, t, sp)
    return runs


def compile_decode(cfg: Config, *, topology: str | None = None, batch: int = 1, prompt_len: int = 128,
                   max_new_tokens: int = 64, kernels: str | None = None, bits: float | None = None,
                   sparsity: float | None = None, block_size: int | None = None, **groups: float | None) -> dict:
    """Compile ``cfg``'s prefill and KV-cache decode ahead of time (no weights read) for ``topology`` (or
    the local devices), under the same sparsity options as :func:`decode_runs`, and with ``kernels``
    (default: the config's) and ``bits`` (the packed format with kernels, default 2): ``train.aot.decode_report``'s
    dict (memory per device, what was compiled, the compiler's step time beside the byte roofline).
    An option that cannot apply to the compiled program is a ``ConfigError``, never dropped."""
    if batch < 1 or prompt_len < 1 or max_new_tokens < 2:
        raise ConfigError(f"--batch and --prompt_len must be positive and --max_new_tokens at least 2, got "
                          f"{batch}, {prompt_len} and {max_new_tokens}")
    kernels = cfg.model.kernels if kernels is None else kernels
    given = sparsity is not None or block_size is not None or any(v is not None for v in groups.values())
    if cfg.model.lte.enabled and (kernels != "off" or given):
        raise ConfigError("an LTE model decodes with its own sparsity and kernels off (no --kernels, --sparsity)")
    if bits is not None and kernels == "off":
        raise ConfigError(f"--bits {bits:g} sets the packed weight format of the kernels, and this model decodes "
                          f"with kernels off (add --kernels on)")
    sparse = sparsity_config(sparsity, default=cfg.model.sparsity, block_size=block_size, **groups)
    model = cfg.model.replace(sparsity=sparse, kernels=kernels)
    return decode_report(dataclasses.replace(cfg, model=model), topology, batch, prompt_len, max_new_tokens,
                         bits=2 if bits is None else bits)
