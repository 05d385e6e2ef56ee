"""Micro-benchmarks of the sparse layer, the train step and the kernels, each printed as ratios measured in one run.

``qsparse bench topk``: a top-K-sparsified linear layer, forward + backward, against the
same dense layer (and against a ``lax.top_k`` formulation, the obvious way to write it).
``qsparse bench step --config configs/tiny.yaml``: a full train step with the config's
sparsity against the same model dense.
``qsparse bench kernels [--quick]``: ``kernels.qsparse_matmul`` (top-K, int8, packed
ternary weights) against a dense matmul, with bytes/s and the memory-bandwidth roofline.
``qsparse bench all --out DIR [--quick]``: on a lent GPU / TPU, the native kernel and sharded
train-step checks, the kernel table, the train-step ratio and decode tokens/s in one call (``bench/suite.py``).
``qsparse bench eval``: our eval CLI and ``lm_eval --model qsparse_jax`` against
``lm_eval --model hf`` on a tiny local model and 240 requests (``bench/eval_speed.py``).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from ..config import load_config
from ..kernels import pack_ternary, qsparse_matmul, unpack_levels
from ..kernels import reference as R
from ..ops.topk import keep_count, topk_sparsify
from ..train.step import make_train_step, setup
from .timing import _memory_bandwidth, machine, time_interleaved


def _lax_topk_sparsify(x, k):
    """Top-K through ``lax.top_k`` (a sort), with the same straight-through gradient."""
    idx = jax.lax.top_k(jnp.abs(x), k)[1]
    mask = jnp.zeros(x.shape, bool).at[jnp.arange(x.shape[0])[:, None], idx].set(True)
    y = jnp.where(mask, x, 0)
    return x + jax.lax.stop_gradient(y - x)


def _layer_step(sparsify):
    """jit(fwd + bwd) of ``y = sparsify(x) @ w`` for a fixed cotangent: returns (y, dx, dw).

    y is returned so XLA cannot drop the forward matmul as dead code."""

    def step(x, w, g):
        y, vjp = jax.vjp(lambda x, w: sparsify(x) @ w, x, w)
        return (y, *vjp(g))

    return jax.jit(step)


def bench_topk(args) -> int:
    m, d, n = args.tokens, args.d_in, args.d_out
    k = keep_count(d, 1.0 - args.keep)
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    dtype = jnp.dtype(args.dtype)
    x = jax.random.normal(kx, (m, d), dtype)
    w = (jax.random.normal(kw, (d, n)) * d ** -0.5).astype(dtype)
    g = jax.random.normal(kg, (m, n), dtype)
    fns = {
        "dense": _layer_step(lambda x: x),
        f"top-K k={k}": _layer_step(lambda x: topk_sparsify(x, k)),
        "statistical": _layer_step(lambda x: topk_sparsify(x, k, select="statistical")),
        f"block {args.block_n}:{args.block_m}": _layer_step(lambda x: topk_sparsify(x, args.block_n, block_size=args.block_m)),
        "lax.top_k": _layer_step(lambda x: _lax_topk_sparsify(x, k)),
    }
    t = time_interleaved(fns, (x, w, g), args.repeats)
    print(f"top-K linear layer, fwd+bwd, x[{m}x{d}] @ w[{d}x{n}] {args.dtype}, keep {args.keep:.0%}; {machine()}")
    print(f"{'variant':<18}{'median ms':>11}{'ratio to dense':>16}")
    for name, sec in t.items():
        print(f"{name:<18}{sec * 1e3:>11.2f}{sec / t['dense']:>16.3f}")
    return 0


def step_runners(cfgs: dict, batch) -> dict:
    """name → ``run()``: one train step of that config on ``batch`` (returns the loss; the donated state
    is carried along from call to call)."""

    fns = {}
    for name, c in cfgs.items():
        s, state = setup(c)
        step, b, holder = make_train_step(s), jax.device_put(batch, s.batch_sharding), [state]

        def run(step=step, b=b, holder=holder):
            holder[0], m = step(holder[0], b)
            return m["loss"]

        fns[name] = run
    return fns


def bench_step(args) -> int:
    """Train-step time of a config with its sparsity vs the same model dense, interleaved in one run."""
    import numpy as np

    cfg = load_config(args.config, args.overrides)
    dense = load_config(args.config, [*args.overrides, *(f"model.sparsity.{g}=0" for g in
                                                          ("qkv", "out", "gate_up", "down"))])
    batch = np.random.default_rng(0).integers(0, 256, (cfg.data.batch_size, cfg.data.seq_len + 1), dtype=np.int32)
    fns = step_runners({"dense": dense, "q-sparse": cfg}, batch)
    t = time_interleaved(fns, (), args.repeats)
    sp = cfg.model.sparsity
    print(f"train step, {args.config} {' '.join(args.overrides)} (batch {cfg.data.batch_size} x {cfg.data.seq_len}, "
          f"sparsity qkv/out/gate_up/down {sp.qkv}/{sp.out}/{sp.gate_up}/{sp.down}); {machine()}")
    print(f"{'variant':<18}{'median ms':>11}{'ratio to dense':>16}")
    for name, sec in t.items():
        print(f"{name:<18}{sec * 1e3:>11.2f}{sec / t['dense']:>16.3f}")
    return 0


def _kernel_variants(x, wf, w, k, on_cpu, formulations):
    """name -> (jitted fn, args, bytes of weights it must read)."""

    m, d = x.shape
    n = wf.shape[1]
    c = w.data.shape[1]
    q, _ = R.quantize_input(x, None if k == d else k)
    kept = int(jnp.sum(jnp.any(q != 0, axis=0)))
    rows = min(d, m * k)
    decode = k < d and m <= 8
    out = {}
    wb = wf.astype(jnp.bfloat16)
    if on_cpu:
        out["dense f32"] = (jax.jit(lambda x, w: x @ w), (x, wf), d * n * 4)
    out["dense bf16"] = (jax.jit(lambda x, w: x.astype(jnp.bfloat16) @ w), (x, wb), d * n * 2)
    impls = ("xla",) if on_cpu else ("pallas", "xla")
    for impl in impls:
        out[f"qsparse {impl}"] = (jax.jit(lambda x, w, impl=impl: qsparse_matmul(x, w, k=k, impl=impl)), (x, w),
                                  (kept if decode else d) * c)
    # the selection and quantization alone (inside every "qsparse" row): 31 counting passes over x
    out["top-K + int8 of x"] = (jax.jit(lambda x: R.quantize_input(x, None if k == d else k)), (x,), 0)
    if formulations:
        idx, count = R.kept_rows(q, rows)
        t8 = unpack_levels(w)
        f = {
            "acc: unpack all, int8 dot": (lambda q, w: R.accumulate_reference(q, w), (q, w), d * c),
            "acc: unpack all, f32 dot": (lambda q, w: R.accumulate_f32(q, w), (q, w), d * c),
            "acc: unpack all, bf16 dot": (lambda q, w: R.accumulate_f32(q, w, jnp.bfloat16), (q, w), d * c),
            "acc: cached int8 t, int8 dot": (R.int8_dot, (q, t8), d * n),
            "acc: cached int8 t, f32 dot": (lambda q, t: (q.astype(jnp.float32) @ t.astype(jnp.float32)), (q, t8), d * n),
            "acc: chunked f32, all rows": (lambda q, w: R.accumulate_chunked(q, w), (q, w), d * c),
        }
        if decode:
            f["acc: gather, int8 dot"] = (lambda q, w: R.accumulate_gathered(q, w, rows, jnp.int8), (q, w), kept * c)
            f["acc: gather, f32 dot"] = (lambda q, w: R.accumulate_gathered(q, w, rows), (q, w), kept * c)
            f["acc: gather, chunked f32"] = (lambda q, w, i, n_: R.accumulate_chunked(q, w, i, n_), (q, w, idx, count),
                                             kept * c)
        out.update({name: (jax.jit(fn), a, b) for name, (fn, a, b) in f.items()})
    return out


def bench_kernels(args) -> int:
    on_cpu = jax.default_backend() == "cpu"
    formulations = on_cpu and not args.no_formulations
    base = "dense f32" if on_cpu else "dense bf16"
    configs = [(s, b, f) for s in args.shapes for b in args.batches for f in args.keeps]
    print(f"kernels: quantize_activations(topk(x)) @ packed ternary w vs {base}; {machine()}", flush=True)
    copy_bw, read_bw = _memory_bandwidth(args.repeats)
    bw = max(copy_bw, read_bw)
    print(f"memory bandwidth over 256 MiB: copy {copy_bw / 1e9:.1f} GB/s (read + write), read {read_bw / 1e9:.1f} GB/s;"
          f" roofline ms = weight bytes / {bw / 1e9:.1f} GB/s; median of {args.repeats} interleaved calls;"
          f" 'acc:' rows time only the integer accumulator (q given)", flush=True)
    for i, ((d, n), m, keep) in enumerate(configs, 1):
        k = keep_count(d, 1.0 - keep) if keep < 1 else d
        kx, kw = jax.random.split(jax.random.key(i))
        x = jax.random.normal(kx, (m, d), jnp.float32)
        wf = jax.random.normal(kw, (d, n), jnp.float32) * d ** -0.5
        w = pack_ternary(wf)
        variants = _kernel_variants(x, wf, w, k, on_cpu, formulations)
        t0 = time.perf_counter()
        t = time_interleaved({name: (lambda f=f, a=a: f(*a)) for name, (f, a, _) in variants.items()}, (), args.repeats)
        print(f"\n[{i}/{len(configs)}] {d}->{n}, batch {m}, keep {keep:.0%} (k={k}) ({time.perf_counter() - t0:.0f} s)")
        print(f"{'variant':<32}{'ms':>10}{'weight MB':>11}{'GB/s':>8}{'roofline ms':>13}{'vs ' + base:>15}")
        for name, (_, _, nbytes) in variants.items():
            sec = t[name]
            print(f"{name:<32}{sec * 1e3:>10.3f}{nbytes / 1e6:>11.2f}{nbytes / sec / 1e9:>8.2f}"
                  f"{nbytes / bw * 1e3:>13.3f}{sec / t[base]:>15.3f}", flush=True)
    return 0

