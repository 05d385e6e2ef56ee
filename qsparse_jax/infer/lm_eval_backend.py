"""lm-evaluation-harness model backend ``qsparse_jax``: our JAX model, dense or Q-Sparse, under lm-eval's
tasks and metrics (``pip install -e ".[eval]"``; lm-eval 0.4.x).

    qsparse lm-eval --model qsparse_jax --model_args hf=DIR,sparsity=0.4 \
        --tasks T --include_path P --batch_size 32 [--log_samples --output_path OUT]

These are lm-eval's own CLI (every lm-eval flag works, ``--model hf`` too) with this backend registered:
lm-eval 0.4 finds models only in its registry and reads no plugin entry points, so a plain ``lm_eval``
process cannot see a model defined outside its source tree. In Python, importing this module registers
it: ``import qsparse_jax.infer.lm_eval_backend; lm_eval.simple_evaluate(model="qsparse_jax", ...)``.

``--model_args`` keys: ``hf=DIR`` or ``ckpt=DIR`` (a run's checkpoints directory or one step of it);
``sparsity=S`` for every projection group and/or per group ``qkv=``, ``out=``, ``gate_up=``, ``down=``
(default: the model's own sparsity, dense for a plain HF model); ``block_size=M`` (N:M); ``kernels=on``
(1.58-bit models: the packed int8 x ternary kernels); ``bits=2|1.6`` (packed format); ``tokenizer=PATH``;
``max_length`` (default the model's max_seq_len); ``max_gen_toks`` (default 256). ``--batch_size N``
sets the rows per batch (``auto`` means 32: batches here are bucketed by width, not searched for).

Requests follow lm-eval's HF backend (``lm_eval/models/huggingface.py``): ``loglikelihood`` through
``TemplateLM``'s context / continuation split and left truncation to ``max_length + 1`` tokens;
``loglikelihood_rolling`` over ``get_rolling_token_windows`` windows; ``generate_until`` with the context
left-truncated to ``max_length - max_gen_toks`` tokens, greedy (or sampled with ``do_sample`` and a
``temperature``) through the KV-cache decoder, cut at the end-of-text token and then at the first stop
sequence (``until``). Scoring is the eval CLI's: bucketed widths, one compiled program per width.
"""

from __future__ import annotations

import logging

import numpy as np

from ..checkpoints.source import load
from ..errors import ConfigError
from ..nn.decode import _pick, init_cache
from ..progress import Progress
from .evaluate import Scorer, bucket_widths, make_batches, rolling_windows
from .variants import sparsity_config, variant

try:
    import lm_eval.models  # noqa: F401  lm-eval registers its own models only into an empty registry: first
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # the base install: the console script still says what to install, in one line
    _MISSING = 'the lm-eval backend needs lm-evaluation-harness: pip install -e ".[eval]"'
    TemplateLM, register_model = object, (lambda *names: (lambda cls: cls))
else:
    _MISSING = None


log = logging.getLogger(__name__)
MODEL_ARGS = ("hf", "ckpt", "sparsity", "qkv", "out", "gate_up", "down", "block_size", "kernels", "bits",
              "tokenizer", "max_length", "max_gen_toks", "batch_size", "max_batch_size", "device")


DEFAULT_BATCH = 32
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature"}


def _batch_size(v) -> int:
    if v is None or (isinstance(v, str) and v.startswith("auto")):
        return DEFAULT_BATCH
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise ConfigError(f"batch_size must be a positive integer or 'auto', got {v!r}") from None
    if n < 1:
        raise ConfigError(f"batch_size must be a positive integer or 'auto', got {v!r}")
    return n


def _number(key: str, v, kind=float):
    if v is None:
        return None
    try:
        return kind(v)
    except (TypeError, ValueError):
        raise ConfigError(f"--model_args {key} must be a number, got {v!r}") from None


@register_model("qsparse_jax")
class QSparseJaxLM(TemplateLM):
    """lm-eval ``LM`` over a qsparse-jax model (see the module docstring for ``--model_args``)."""

    def __init__(self, hf: str | None = None, ckpt: str | None = None, sparsity=None, qkv=None, out=None,
                 gate_up=None, down=None, block_size=None, kernels="off", bits=2, tokenizer: str | None = None,
                 max_length=None, max_gen_toks=256, batch_size=None, max_batch_size=None, device=None, **unknown):
        if _MISSING:
            raise ConfigError(_MISSING)
        super().__init__()
        if unknown:
            raise ConfigError(f"unknown --model_args key(s) {', '.join(sorted(unknown))} for qsparse_jax; "
                              f"known: {', '.join(MODEL_ARGS)}")

        groups = {g: _number(g, v) for g, v in (("qkv", qkv), ("out", out), ("gate_up", gate_up), ("down", down))}
        kernels = {True: "on", False: "off"}.get(kernels, kernels)  # lm-eval parses on/off-like values to bools
        self.loaded = load(hf=None if hf is None else str(hf), ckpt=None if ckpt is None else str(ckpt),
                           tokenizer=tokenizer)
        model = self.loaded.model
        self.sparsity = sparsity_config(_number("sparsity", sparsity), default=model.config.sparsity,
                                        block_size=_number("block_size", block_size, int), **groups)
        self.apply, self.params = variant(model, self.sparsity, str(kernels), _number("bits", bits))
        self.config = self.apply.config
        self._max_length = _number("max_length", max_length, int) or self.config.max_seq_len
        if not 2 <= self._max_length <= self.config.max_seq_len:
            raise ConfigError(f"max_length must be in [2, {self.config.max_seq_len}] (the model's max_seq_len), "
                              f"got {self._max_length}")
        self.max_gen_toks = _number("max_gen_toks", max_gen_toks, int)
        self.batch_size_per_gpu = _batch_size(batch_size)

        self._scorer = Scorer(self.apply, self.params)
        self._decoders: dict = {}

    # --- what lm-eval asks of a TemplateLM ------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.loaded.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.loaded.prefix_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer_name(self) -> str:
        return str(self.loaded.tokenizer.spec).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # tokenizer.json encodes without special tokens, as lm-eval's HF backend does by default
        return [int(t) for t in self.loaded.tokenizer.encode(string)]

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.loaded.tokenizer.decode(tokens)

    def get_model_info(self) -> dict:
        return {"qsparse_jax_source": self.loaded.source,
                "qsparse_jax_sparsity": {g: getattr(self.sparsity, g) for g in ("qkv", "out", "gate_up", "down")},
                "qsparse_jax_kernels": self.config.kernels, "qsparse_jax_compiles": self._scorer.compiles,
                "qsparse_jax_decoders": len(self._decoders)}

    # --- scoring ----------------------------------------------------------------------------------
    def _score(self, pairs: list[tuple[list[int], list[int]]], desc: str, disable_tqdm: bool):
        batches = make_batches(pairs, self.max_length, self.batch_size, self.loaded.mesh)
        return self._scorer(batches, desc=desc, progress=False if disable_tqdm else True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        ll, greedy = self._score([(ctx, cont) for _, ctx, cont in requests], "loglikelihood requests", disable_tqdm)
        out = []
        for (key, _, _), l, g in zip(requests, ll, greedy):
            answer = (float(l), bool(g))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            windows = rolling_windows(self.tok_encode(text), self.prefix_token_id, self.max_length)
            pairs += windows
            owner += [i] * len(windows)
        ll, _ = self._score(pairs, "loglikelihood_rolling windows", disable_tqdm) if pairs else (np.zeros(0), None)
        totals = np.zeros(len(requests))
        np.add.at(totals, np.asarray(owner, int), ll)
        for req, t in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(t))
        return [float(t) for t in totals]

    # --- generation -------------------------------------------------------------------------------
    def _gen_options(self, kwargs: dict) -> tuple[tuple[str, ...], int, float]:
        if not isinstance(kwargs, dict):
            raise ConfigError(f"generation kwargs must be a dict, got {kwargs!r}")
        ignored = set(kwargs) - _GEN_KEYS
        if ignored:
            log.warning("qsparse_jax ignores generation kwargs %s", sorted(ignored))
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        eos = self.tok_decode([self.eot_token_id])
        if eos and eos not in until:
            until.append(eos)
        max_gen = int(kwargs.get("max_gen_toks", self.max_gen_toks))
        temperature = float(kwargs.get("temperature", 1.0 if kwargs.get("do_sample") else 0.0))
        if not kwargs.get("do_sample"):
            temperature = 0.0
        if not 1 <= max_gen < self.max_length:
            raise ConfigError(f"max_gen_toks must be in [1, max_length {self.max_length}), got {max_gen}")
        return tuple(until), max_gen, temperature

    def _decoder(self, rows: int, width: int, max_gen: int, temperature: float):
        key = (rows, width, max_gen, temperature)
        if key not in self._decoders:
            self._decoders[key] = make_padded_generate(self.apply, self.config, rows, width, max_gen, temperature)
        return self._decoders[key]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same options and context length decode together, up to ``batch_size`` rows (a
        power of two at most, so row counts come in few shapes); contexts are right-padded to a bucket
        width, so one decoder is compiled per (rows, width, options), not per context length."""
        import jax

        jobs: dict = {}
        for i, req in enumerate(requests):
            context, kwargs = req.args
            until, max_gen, temperature = self._gen_options(kwargs)
            ids = self.tok_encode(context)[-(self.max_length - max_gen):] or [self.prefix_token_id]
            jobs.setdefault((until, max_gen, temperature, len(ids)), []).append((i, ids))
        out: list[str | None] = [None] * len(requests)
        bar = Progress(len(requests), "generate_until", "requests", enabled=not disable_tqdm)
        key = jax.random.key(0)
        for (until, max_gen, temperature, plen), items in sorted(jobs.items(), key=lambda kv: -kv[0][3]):
            width = next(w for w in bucket_widths(self.max_length - max_gen) if w >= plen)
            for s in range(0, len(items), self.batch_size):
                chunk = items[s:s + self.batch_size]
                rows = min(1 << (len(chunk) - 1).bit_length(), self.batch_size)
                prompt = np.zeros((rows, width), np.int32)
                prompt[:len(chunk), :plen] = [ids for _, ids in chunk]
                key, sub = jax.random.split(key)
                toks = np.asarray(self._decoder(rows, width, max_gen, temperature)(self.params, prompt, plen, sub))
                for (i, _), row in zip(chunk, toks[:, :max_gen]):
                    row = row.tolist()
                    if self.eot_token_id in row:  # generation ends at end-of-text, as transformers' generate
                        row = row[:row.index(self.eot_token_id)]
                    text = self.tok_decode(row)
                    for stop in until:  # lm-eval's postprocess: cut at each stop sequence in turn
                        if stop:
                            text = text.split(stop)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out


def make_padded_generate(apply, config, rows: int, width: int, max_new: int, temperature: float = 0.0):
    """Jitted ``run(params, prompt [rows, width], plen, key) -> tokens [rows, max(max_new, 2)]``: the prompt's
    first ``plen`` tokens (the same for every row; the rest is padding) are prefilled in one pass, then
    decoding continues from position ``plen`` with the KV cache. Right padding is harmless: causal
    attention keeps positions < plen from seeing it, and setting the cache index to ``plen`` masks the
    padded keys and makes decoding overwrite them. ``plen`` is traced, so one program serves every
    prompt length up to ``width``."""
    import jax
    import jax.numpy as jnp

    steps = max(max_new, 2)

    @jax.jit
    def run(params, prompt, plen, key):
        logits, cache = apply(params, prompt, cache=init_cache(config, rows, width + steps))
        last = jax.lax.dynamic_index_in_dim(logits, plen - 1, axis=1, keepdims=False)
        if isinstance(cache, dict):  # scan_layers: one dict, a leading layer axis
            cache = {**cache, "index": jnp.full_like(cache["index"], plen)}
        else:
            cache = [{**c, "index": jnp.asarray(plen, c["index"].dtype)} for c in cache]
        k0, key = jax.random.split(key)
        first = _pick(last, k0, temperature)

        def step(carry, k):
            tok, cache = carry
            logits, cache = apply(params, tok[:, None], cache=cache)
            nxt = _pick(logits[:, -1], k, temperature)
            return (nxt, cache), nxt

        _, rest = jax.lax.scan(step, (first, cache), jax.random.split(key, steps - 1))
        return jnp.concatenate([first[:, None], rest.T], axis=1)

    return run

