"""Top-K threshold search: passes of a WAYS-ary search against binary search, one run, interleaved.

``python benchmarks/topk_ways.py`` on any backend; prints each width's median time as a ratio to binary
search (31 passes) for decode, small-batch and training row counts of the 7B widths."""

import time

import jax
import numpy as np

from qsparse_jax.ops import topk as T


def main():
    print(f"top-K search widths; {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"{'rows x d':>14} {'k':>6} " + " ".join(f"{'ways ' + str(w):>14}" for w in (2, 4, 8, 16)))
    for rows, d in [(1, 4096), (8, 11008), (8192, 4096)]:
        x = jax.random.normal(jax.random.key(0), (rows, d))
        k = int(0.4 * d)
        fs = {}
        for ways in (2, 4, 8, 16):
            f = jax.jit(lambda x, ways=ways: T._rows_topk_mask(x, k, ways=ways))
            ref = f(x).block_until_ready()
            assert int(ref.sum()) == rows * k
            fs[ways] = f
        ts = {w: [] for w in fs}
        for _ in range(30):
            for w, f in fs.items():
                t0 = time.perf_counter()
                f(x).block_until_ready()
                ts[w].append(time.perf_counter() - t0)
        base = np.median(ts[2])
        print(f"{rows:>6} x {d:<6} {k:>6} " + " ".join(f"{np.median(ts[w]) * 1e3:8.3f} ms {np.median(ts[w]) / base:4.2f}"
                                                       for w in fs))


if __name__ == "__main__":
    main()
