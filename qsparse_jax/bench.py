"""Benchmarks, each printed as ratios measured in one run.

``python -m qsparse_jax.bench topk``: a top-K-sparsified linear layer, forward + backward, against the
same dense layer (and against a ``lax.top_k`` formulation, the obvious way to write it).
``python -m qsparse_jax.bench step --config configs/tiny.yaml``: a full train step with the config's
sparsity against the same model dense.
``python -m qsparse_jax.bench kernels [--quick]``: ``kernels.qsparse_matmul`` (top-K, int8, packed
ternary weights) against a dense matmul, with bytes/s and the memory-bandwidth roofline.
``python -m qsparse_jax.bench all --out DIR [--quick]``: on a lent GPU / TPU, the native kernel and sharded
train-step checks, the kernel table, the train-step ratio and decode tokens/s in one call (``bench_all``).
``python -m qsparse_jax.bench eval``: our eval CLI and ``lm_eval --model qsparse_jax`` against
``lm_eval --model hf`` on a tiny local model and 240 requests (``bench_eval.py``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from .sparsity import keep_count, topk_sparsify


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


def time_interleaved(fns: dict, args, repeats: int) -> dict[str, float]:
    """Median seconds per call, the candidates run in turn so machine noise hits them alike."""
    for f in fns.values():  # compile + warm up
        jax.block_until_ready(f(*args))
        jax.block_until_ready(f(*args))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine() -> str:
    dev = jax.devices()[0]
    return f"{platform.processor() or platform.machine()}, {jax.device_count()}x {dev.device_kind} ({dev.platform}), jax {jax.__version__}"


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
    from .trainer import make_train_step, setup

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

    from .config import load_config

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


# --- kernels: int8 x packed ternary with top-K vs a dense matmul ---------------------------------

def _memory_bandwidth(repeats: int) -> tuple[float, float]:
    """(copy, read) bytes/s over a 256 MiB array, measured now: a copy (read + write, 2 bytes moved
    per byte) and a sum (read only, what a weight-bound matmul does). The roofline uses the larger."""
    a = jnp.arange(64 << 20, dtype=jnp.float32)  # 256 MiB
    t = time_interleaved({"copy": jax.jit(lambda a: a + 1), "read": jax.jit(jnp.sum)}, (a,), repeats)
    return 2 * a.nbytes / t["copy"], a.nbytes / t["read"]


def _kernel_variants(x, wf, w, k, on_cpu, formulations):
    """name -> (jitted fn, args, bytes of weights it must read)."""
    from .kernels import qsparse_matmul, unpack_levels
    from .kernels import reference as R

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
    from .kernels import pack_ternary

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


def _shape(s: str) -> tuple[int, int]:
    try:
        d, n = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be INxOUT like 4096x11008, got {s!r}") from None
    if d < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"shape sizes must be positive, got {s!r}")
    return d, n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsparse_jax.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    tk = sub.add_parser("topk", help="top-K linear layer fwd+bwd vs dense")
    tk.add_argument("--tokens", type=int, default=2048)
    tk.add_argument("--d-in", type=int, default=1024)
    tk.add_argument("--d-out", type=int, default=4096)
    tk.add_argument("--keep", type=float, default=0.7, help="kept fraction (1 - sparsity)")
    tk.add_argument("--block-n", type=int, default=16)
    tk.add_argument("--block-m", type=int, default=32)
    tk.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    tk.add_argument("--repeats", type=int, default=15)
    st = sub.add_parser("step", help="train step of a config: with its sparsity vs dense")
    st.add_argument("--config", default="configs/tiny.yaml")
    st.add_argument("--repeats", type=int, default=10)
    st.add_argument("overrides", nargs="*")
    kn = sub.add_parser("kernels", help="qsparse_matmul (top-K, int8, packed ternary) vs a dense matmul")
    kn.add_argument("--shapes", type=_shape, nargs="+", default=[(4096, 11008), (11008, 4096), (4096, 4096)])
    kn.add_argument("--batches", type=int, nargs="+", default=[1, 8, 512])
    kn.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.6, 0.4], help="kept fractions (1 - sparsity)")
    kn.add_argument("--repeats", type=int, default=5)
    kn.add_argument("--no-formulations", action="store_true", help="CPU: skip the accumulator formulations")
    kn.add_argument("--quick", action="store_true", help="4096x4096, batches 1 and 8, keep 100%% and 40%%, 3 repeats")
    ev = sub.add_parser("eval", help="our eval CLI and lm_eval --model qsparse_jax vs lm_eval --model hf (issue 12)")
    ev.add_argument("--items", type=int, default=60, help="four-choice items (4 requests each)")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--repeats", type=int, default=2, help="interleaved runs of each; the best is kept")
    ev.add_argument("--out", default=None, help="work directory (default: a fresh temporary one)")
    from .bench_all import add_parser as _add_all

    _add_all(sub)  # bench all: checks, kernels, train step, decode -> report.md + report.json
    args = p.parse_args(argv)
    if args.cmd == "all":
        from .bench_all import bench_all

        return bench_all(args)
    if args.cmd == "eval":
        from .bench_eval import bench_eval

        if min(args.items, args.batch_size, args.repeats) < 1:
            print("error: --items, --batch-size and --repeats must be positive", file=sys.stderr)
            return 2
        return bench_eval(args)
    if args.cmd == "kernels":
        if args.quick:
            args.shapes, args.batches, args.keeps, args.repeats = [(4096, 4096)], [1, 8], [1.0, 0.4], 3
        if min(args.batches) < 1 or args.repeats < 1 or not all(0.0 < f <= 1.0 for f in args.keeps):
            print("error: --batches and --repeats must be positive and --keeps in (0, 1]", file=sys.stderr)
            return 2
        return bench_kernels(args)
    if args.cmd == "step":
        from .config import ConfigError

        try:
            return bench_step(args)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        if not 0.0 < args.keep <= 1.0:
            raise ValueError(f"--keep must be in (0, 1], got {args.keep}")
        if min(args.tokens, args.d_in, args.d_out, args.repeats) < 1:
            raise ValueError("--tokens, --d-in, --d-out and --repeats must be positive")
        if args.d_in % args.block_m or not 1 <= args.block_n <= args.block_m:
            raise ValueError(f"--block-m must divide --d-in and 1 <= --block-n <= --block-m, got "
                             f"{args.block_n}:{args.block_m} with d_in={args.d_in}")
        return bench_topk(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
