"""Timing helpers every benchmark shares: interleaved repeats, the machine's name, memory bandwidth.
"""

from __future__ import annotations

import platform
import statistics
import time

import jax
import jax.numpy as jnp


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


def _memory_bandwidth(repeats: int) -> tuple[float, float]:
    """(copy, read) bytes/s over a 256 MiB array, measured now: a copy (read + write, 2 bytes moved
    per byte) and a sum (read only, what a weight-bound matmul does). The roofline uses the larger."""
    a = jnp.arange(64 << 20, dtype=jnp.float32)  # 256 MiB
    t = time_interleaved({"copy": jax.jit(lambda a: a + 1), "read": jax.jit(jnp.sum)}, (a,), repeats)
    return 2 * a.nbytes / t["copy"], a.nbytes / t["read"]

