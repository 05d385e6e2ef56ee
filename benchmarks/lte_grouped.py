"""LTE's selected experts at batch > 1: the loop over the union vs grouped matmuls vs the dense FFN, one run.

``JAX_PLATFORMS=cpu python benchmarks/lte_grouped.py [--quick] [--no_tpu]`` (the TPU section needs
libtpu). Half of the experts selected per token (the router's
weights random, so each score ``σ(x · W_r,e)`` is above τ = 0.5 with probability ½: 50 % FFN sparsity), SiLU GLU,
experts of 32 neurons, float32 on the CPU. Every variant is the real ``LTEFeedForward`` layer (``execution:
gather``, router included) with ``gather_impl`` forced; "dense" is the same weights through ``FeedForward``.

1. **CPU**, interleaved medians: each variant's time as a ratio to the dense FFN (< 1: faster than dense).
2. **TPU v5p, compile-only** (libtpu's topology description; nothing runs), bf16 at the 7B FFN shape
   4096 → 11008 → 4096: the compiler's FLOPs, bytes and estimated time of the grouped (``ragged_dot``) layer and
   of the loop (its body's figures times the expected trip count, the union: the compiler counts a loop body
   once) against the dense FFN, and the byte roofline: the bytes a grouped matmul must read (the weights
   of the experts some token selected, ``E·(1 − ½^B)`` on average at batch B, plus activations) against the
   dense FFN's, at 2765 GB/s.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qsparse_jax.bench.timing import machine, time_interleaved
from qsparse_jax.config import LTEConfig, ModelConfig
from qsparse_jax.nn.layers import FeedForward
from qsparse_jax.nn.lte import ExpertMajor, LTEFeedForward, expert_major_weights, tile_rows

EXPERT = 32
V5P_HBM = 2765e9  # bytes/s, one v5p chip


def _cfg(dim, hidden, dtype="float32"):
    return ModelConfig(dim=dim, hidden_dim=hidden, activation="silu", dtype=dtype, param_dtype=dtype,
                       lte=LTEConfig(enabled=True, expert_size=EXPERT, stage=2, execution="gather"))


def _layer(dim, hidden):
    ffn = LTEFeedForward(_cfg(dim, hidden), rngs=nnx.Rngs(0))
    ffn.router[...] = jax.random.normal(jax.random.key(1), ffn.router[...].shape)  # P(score > τ) = ½ per expert
    ffn.expert_major = nnx.data(ExpertMajor(expert_major_weights(ffn)))
    return ffn


def _variants(ffn, impls):
    """name → jitted ``f(state, x)``: the dense FFN and the LTE layer with each ``gather_impl``."""
    graphdef, _ = nnx.split(ffn)
    out = {"dense": jax.jit(lambda st, x: FeedForward.__call__(nnx.merge(graphdef, st), x, None))}
    for impl in impls:
        def f(st, x, impl=impl):
            m = nnx.merge(graphdef, st)
            m.gather_impl = impl
            return m(x, None)
        out[impl] = jax.jit(f)
    return out


def cpu(shapes, batches, repeats, ragged_up_to):
    print(f"\n## CPU: LTE layer (execution=gather) vs dense FFN, 50 % FFN sparsity, float32; {machine()}")
    print(f"{'dim->hidden':>12} {'batch':>5} {'experts/tok':>11} {'union':>6} {'dense ms':>9} "
          f"{'loop/dense':>11} {'tiles/dense':>12} {'ragged/dense':>13} {'tile':>5}")
    rows = []
    for dim, hidden in shapes:
        ffn = _layer(dim, hidden)
        state = nnx.state(ffn)
        for b in batches:
            x = jax.random.normal(jax.random.key(b), (b, 1, dim))  # b decoded tokens (batch b, length 1)
            sel = np.asarray(ffn.select(ffn.scores(x))).reshape(b, -1)
            impls = ["loop", "tiles"] + (["ragged"] if b * hidden <= ragged_up_to else [])
            fns = _variants(ffn, impls)
            xs, h = ffn.hidden(x)  # the masked computation: every neuron, unselected experts zeroed
            masked = ffn.output(xs, ffn._gate(h, jnp.asarray(sel, jnp.float32).reshape(b, 1, -1)), None)
            for name in impls:
                np.testing.assert_allclose(fns[name](state, x), masked, atol=2e-4, rtol=2e-4)
            t0 = time.perf_counter()
            t = time_interleaved({k: (lambda f=f: f(state, x)) for k, f in fns.items()}, (), repeats)
            r = {k: t[k] / t["dense"] for k in t}
            rows.append(dict(dim=dim, hidden=hidden, batch=b, dense_ms=t["dense"] * 1e3, **{k: r[k] for k in impls}))
            rag = f"{r['ragged']:>13.2f}" if "ragged" in r else f"{'(skipped)':>13}"
            print(f"{dim:>5}->{hidden:<6} {b:>5} {sel.sum(1).mean():>11.1f} {sel.any(0).sum():>6} "
                  f"{t['dense'] * 1e3:>9.3f} {r['loop']:>11.2f} {r['tiles']:>12.2f} {rag} {tile_rows(b):>5}"
                  f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def tpu(batches, topology="v5p-8", dim=4096, hidden=11008):
    from qsparse_jax.train.topology import tpu_devices

    devices, chip = tpu_devices(topology)
    dev = devices[0]
    cfg = _cfg(dim, hidden, "bfloat16")
    E = hidden // EXPERT
    abstract = nnx.eval_shape(lambda: LTEFeedForward(cfg, rngs=nnx.Rngs(0)))
    abstract.expert_major = nnx.data(ExpertMajor(jax.ShapeDtypeStruct((2, E, dim, EXPERT), jnp.bfloat16)))
    graphdef, state = nnx.split(abstract)
    on = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(dev))
    state = jax.tree.map(on, state)
    fns = _variants(abstract, ["ragged", "loop"])
    w_bytes = 3 * dim * hidden * 2
    print(f"\n## {chip.name} ({topology}, one device), compile-only, bf16, FFN {dim}->{hidden}->{dim}, {E} experts "
          f"of {EXPERT}, 50 % FFN sparsity; the compiler's cost analysis; roofline = bytes / {V5P_HBM / 1e9:.0f} GB/s")
    print(f"{'batch':>5} {'variant':>7} {'GFLOP':>7} {'MB':>8} {'est. us':>8} {'est./dense':>10} "
          f"{'bytes/dense':>11} {'roofline us':>11} {'roofline/dense':>14}")
    rows = []
    for b in batches:
        x = on(jax.ShapeDtypeStruct((b, 1, dim), jnp.bfloat16))
        act = 2 * b * dim * 2  # x in, y out
        union = E * (1 - 0.5 ** b)  # experts some token selected (expected)
        need = {"dense": w_bytes + act, "ragged": w_bytes * union / E + act, "loop": w_bytes * union / E + act}
        cost = {}
        for name, f in fns.items():
            with jax.default_device(dev):
                c = f.lower(state, x).compile().cost_analysis()
            c = c[0] if isinstance(c, (list, tuple)) else c
            trips = union if name == "loop" else 1  # the compiler counts a while loop's body once
            cost[name] = tuple(trips * float(c.get(k, 0)) for k in ("flops", "bytes accessed", "optimal_seconds"))
        for name, (fl, by, sec) in cost.items():
            d = cost["dense"]
            rows.append(dict(batch=b, variant=name, flops=fl, bytes=by, seconds=sec, need=need[name]))
            print(f"{b:>5} {name:>7} {fl / 1e9:>7.2f} {by / 1e6:>8.1f} {sec * 1e6:>8.1f} {sec / d[2]:>10.2f} "
                  f"{by / d[1]:>11.2f} {need[name] / V5P_HBM * 1e6:>11.1f} {need[name] / need['dense']:>14.3f}",
                  flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats (a smoke test)")
    p.add_argument("--no_tpu", action="store_true", help="skip the compile-only TPU section")
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args(argv)
    shapes = [(64, 256)] if a.quick else [(256, 704), (512, 1376), (1024, 2816)]
    batches = [1, 8] if a.quick else [1, 8, 32, 64]
    cpu(shapes, batches, 2 if a.quick else a.repeats, ragged_up_to=8 * 1376)
    if not a.no_tpu:
        tpu([1, 8, 64])
    return 0


if __name__ == "__main__":
    sys.exit(main())
