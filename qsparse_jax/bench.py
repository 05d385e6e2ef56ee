"""Benchmarks, each printed as ratios measured in one run.

``python -m qsparse_jax.bench topk``: a top-K-sparsified linear layer, forward + backward, against the
same dense layer (and against a ``lax.top_k`` formulation, the obvious way to write it).
``python -m qsparse_jax.bench step --config configs/tiny.yaml``: a full train step with the config's
sparsity against the same model dense.
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


def bench_step(args) -> int:
    """Train-step time of a config with its sparsity vs the same model dense, interleaved in one run."""
    import numpy as np

    from .config import load_config
    from .trainer import make_train_step, setup

    cfg = load_config(args.config, args.overrides)
    dense = load_config(args.config, [*args.overrides, *(f"model.sparsity.{g}=0" for g in
                                                          ("qkv", "out", "gate_up", "down"))])
    batch = np.random.default_rng(0).integers(0, 256, (cfg.data.batch_size, cfg.data.seq_len + 1), dtype=np.int32)
    fns, states = {}, {}
    for name, c in (("dense", dense), ("q-sparse", cfg)):
        s, state = setup(c)
        step = make_train_step(s)
        b = jax.device_put(batch, s.batch_sharding)
        states[name] = [state]

        def run(step=step, b=b, name=name):  # the state is donated: carry it along
            states[name][0], m = step(states[name][0], b)
            return m["loss"]

        fns[name] = run
    t = time_interleaved(fns, (), args.repeats)
    sp = cfg.model.sparsity
    print(f"train step, {args.config} {' '.join(args.overrides)} (batch {cfg.data.batch_size} x {cfg.data.seq_len}, "
          f"sparsity qkv/out/gate_up/down {sp.qkv}/{sp.out}/{sp.gate_up}/{sp.down}); {machine()}")
    print(f"{'variant':<18}{'median ms':>11}{'ratio to dense':>16}")
    for name, sec in t.items():
        print(f"{name:<18}{sec * 1e3:>11.2f}{sec / t['dense']:>16.3f}")
    return 0


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
    args = p.parse_args(argv)
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
