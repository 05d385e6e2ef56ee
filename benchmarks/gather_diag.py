"""Decode (gather) kernel on a GPU: every variant's exactness against the integer reference and its time,
as a ratio to a dense bf16 product of the same shape, in one run.

``python benchmarks/gather_diag.py``: the split count (1 / default). The first H200 run (at commit 88c98de)
also compared two index forms and atomic adds against partial sums: RESULTS.md keeps that table."""

import time

import jax
import jax.numpy as jnp
import numpy as np

from qsparse_jax.kernels import pack_ternary
from qsparse_jax.kernels import pallas_gpu as g
from qsparse_jax.kernels import reference as R
from qsparse_jax.kernels.pallas import planes_to_columns


def _time(f, *args, n=50):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main():
    print(f"gather kernel variants; {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"{'m x d -> n':>18} {'bits':>4} {'index':>5} {'mode':>7} {'splits':>6} {'exact':>5} {'us':>8} {'vs bf16':>7}")
    for (m, d, n) in [(1, 4096, 11008), (8, 11008, 4096)]:
        kx, kw = jax.random.split(jax.random.key(m))
        x = jax.random.normal(kx, (m, d), jnp.float32)
        wf = jax.random.normal(kw, (d, n), jnp.float32) * d ** -0.5
        dense = jax.jit(lambda a, b: a @ b)
        t_dense = _time(dense, x.astype(jnp.bfloat16), wf.astype(jnp.bfloat16))
        for bits in (2, 1.6):
            w = pack_ternary(wf, bits)
            k = int(0.4 * d)
            q, _ = R.quantize_input(x, k)
            expect = np.asarray(R.accumulate_reference(q, w))
            idx, count = R.kept_rows(q, min(d, m * k))
            qg = R.gather_columns(q, idx, count)
            index, mode = "2d", "partial"
            for splits in (1, None):
                f = jax.jit(lambda c, i, qq, dd, splits=splits: planes_to_columns(
                    g.gather_matmul(c, i, qq, dd, bits=bits, splits=splits), n))
                try:
                    out = np.asarray(f(count[None], idx, qg, w.data))
                    exact = bool(np.array_equal(out, expect))
                    t = _time(f, count[None], idx, qg, w.data)
                    print(f"{m:>4} x {d:>5} -> {n:<5} {bits:>4} {index:>5} {mode:>7} {str(splits):>6} "
                          f"{str(exact):>5} {t * 1e6:8.1f} {t / t_dense:7.2f}")
                except Exception as e:  # noqa: BLE001 - report every variant
                    print(f"{m:>4} x {d:>5} -> {n:<5} {bits:>4} {index:>5} {mode:>7} {str(splits):>6} "
                          f"error {type(e).__name__}: {str(e)[:120]}")
        print(f"  dense bf16 {m}x{d}->{n}: {t_dense * 1e6:.1f} us")


if __name__ == "__main__":
    main()
