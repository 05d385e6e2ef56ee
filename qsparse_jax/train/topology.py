"""Accelerator chips and TPU slice names: HBM, peak FLOP/s, and devices to compile for without owning any.

``tpu_devices("v5p-128")`` returns the 64 devices of a TPU v5p slice from libtpu's topology
description (``jax.experimental.topologies``), so a train step can be compiled and measured for a pod
on a CPU machine (as MaxText's ``train_compile.py`` does). Slice names follow Cloud TPU's accelerator
types: v4 and v5p count TensorCores (2 per chip), v5e and v6e count chips.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..errors import ConfigError

GIB = 1 << 30


@dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int  # per device as JAX sees it (a v4 / v5p megacore chip is one device)
    peak_flops: float  # dense bf16 FLOP/s per device
    cores_per_chip: int = 1  # how slice names count


CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 2),
    "v5e": Chip("TPU v5e", int(15.75 * GIB), 197e12),
    "v5p": Chip("TPU v5p", int(95.74 * GIB), 459e12, 2),  # what libtpu reports as available
    "v6e": Chip("TPU v6e", 32 * GIB, 918e12),
    "h200": Chip("NVIDIA H200", 141 * GIB, 989e12),
    "h100": Chip("NVIDIA H100", 80 * GIB, 989e12),
    "a100": Chip("NVIDIA A100", 80 * GIB, 312e12),
}


# device_kind substrings → chip, most specific first ("TPU v5 lite" is a v5e, "TPU v5" a v5p)
_KINDS = [("v5 lite", "v5e"), ("v5e", "v5e"), ("v6 lite", "v6e"), ("v6e", "v6e"), ("v5p", "v5p"), ("tpu v5", "v5p"),
          ("tpu v4", "v4"), ("h200", "h200"), ("h100", "h100"), ("a100", "a100")]


# chips in a slice → physical topology (3-D torus for v4 / v5p, 2-D for v5e / v6e)
_TORUS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}


_TORUS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def chip_of(device) -> Chip | None:
    kind = device.device_kind.lower()
    return next((CHIPS[c] for k, c in _KINDS if k in kind), None)


def peak_flops(device) -> float | None:
    chip = chip_of(device)
    return chip.peak_flops if chip else None


def known_topologies() -> list[str]:
    names = []
    for gen, table in (("v4", _TORUS_3D), ("v5p", _TORUS_3D), ("v5e", _TORUS_2D), ("v6e", _TORUS_2D)):
        names += [f"{gen}-{chips * CHIPS[gen].cores_per_chip}" for chips in table]
    return names


def slice_topology(name: str) -> tuple[str, str]:
    """``"v5p-128"`` → ``("v5p", "4x4x4")``; also accepts libtpu's own ``"v5p:4x4x4"``."""
    gen, sep, rest = name.replace(":", "-", 1).partition("-")
    if gen not in ("v4", "v5p", "v5e", "v6e") or not sep:
        raise ConfigError(f"unknown topology {name!r}; known: {', '.join(known_topologies())} (or GEN:AxBxC)")
    if "x" in rest:
        dims = rest.split("x")
        if len(dims) != (3 if gen in ("v4", "v5p") else 2) or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise ConfigError(f"bad topology {name!r}: {gen} takes {'AxBxC' if gen in ('v4', 'v5p') else 'AxB'} chips")
        return gen, rest
    table = _TORUS_3D if gen in ("v4", "v5p") else _TORUS_2D
    count = int(rest) if rest.isdigit() else -1
    chips, r = divmod(count, CHIPS[gen].cores_per_chip)
    if r or chips not in table:
        raise ConfigError(f"unknown topology {name!r}; known: {', '.join(known_topologies())} (or GEN:AxBxC)")
    return gen, table[chips]


def tpu_devices(name: str) -> tuple[list, Chip]:
    """The devices of a TPU slice, for compiling (not running) on this machine; needs libtpu."""
    gen, shape = slice_topology(name)
    if "TPU_ACCELERATOR_TYPE" not in os.environ:  # not on a TPU VM: say so, or libtpu prints a page of warnings
        for k, v in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", name.replace(":", "-")),
                     ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"), ("TPU_MIN_LOG_LEVEL", "3"),
                     ("TF_CPP_MIN_LOG_LEVEL", "3"),
                     ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):  # compiling only: no chip to guard with the lockfile
            os.environ.setdefault(k, v)
    try:
        from jax.experimental import topologies

        dims = [int(d) for d in shape.split("x")] + [1] * (3 - len(shape.split("x")))
        # a host drives up to 2x2x1 chips; a smaller slice is all one host
        kw = {"chips_per_host_bounds": tuple(dims)} if math.prod(dims) < 4 else {}
        desc = topologies.get_topology_desc(f"{gen}:{shape}", platform="tpu", **kw)
    except Exception as e:  # no libtpu, or it refuses the shape: one line either way
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = " (install the tpu extra: pip install -e '.[tpu]')" if "tpu" in msg.lower() and "found" in msg.lower() else ""
        raise ConfigError(f"cannot describe TPU topology {name} ({gen}:{shape}): {msg}{hint}") from None
    n = math.prod(int(d) for d in shape.split("x"))
    devices = list(desc.devices)
    chip = CHIPS[gen]
    if len(devices) == 2 * n:  # one device per TensorCore (no megacore): each holds half a chip
        chip = Chip(chip.name + " core", chip.hbm_bytes // 2, chip.peak_flops / 2, chip.cores_per_chip)
    elif len(devices) != n:
        raise ConfigError(f"libtpu described {len(devices)} devices for {name}, expected {n}")
    return devices, chip



def simulate_cpu_devices(n: int) -> None:
    """Run this process on ``n`` simulated CPU devices (compiling a sharded step without accelerators).
    Must be called before JAX starts its backends (before the first array or ``jax.devices()``)."""
    import jax

    if n < 1:
        raise ConfigError(f"--cpu_devices takes a positive count, got {n}")
    try:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as e:  # the backends already started
        raise ConfigError(f"cannot simulate {n} CPU devices: {str(e).splitlines()[0]}") from None
