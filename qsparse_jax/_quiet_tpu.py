"""Keep JAX from starting the TPU runtime on a machine that has libtpu installed but no TPU chip.

With libtpu installed (the ``tpu`` and ``dev`` extras) and ``JAX_PLATFORMS`` unset, JAX tries the TPU
backend first on every machine; off a TPU VM libtpu then prints a page of warnings ("could not
determine TPU accelerator type", "unexpected worker hostname ...") before JAX falls back to the CPU.
When no TPU chip is on the PCI bus, no TPU environment variable is set and the user chose no
platforms, we choose them: ``cpu`` (``cuda,cpu`` where a CUDA plugin and an NVIDIA GPU are present).
Compiling *for* a TPU slice (``train.py --compile_only --topology``, ``tests/test_kernels_tpu.py``)
loads libtpu through ``jax.experimental.topologies`` and is not affected. Imported by
``qsparse_jax/__init__.py``; cheap (no JAX import). ``JAX_PLATFORMS=...`` (even empty) turns it off.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pkgutil
import sys

_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_ENV = (  # set on TPU VMs (importing JAX sets TPU_SKIP_MDS_QUERY and TPU_LIBRARY_PATH anywhere)
    "TPU_ACCELERATOR_TYPE", "TPU_NAME", "TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES",
    "JAX_FORCE_TPU_INIT")
_NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")


def _tpu_chip_present() -> bool:
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return os.path.exists("/dev/accel0") or bool(glob.glob("/dev/vfio/[0-9]*"))


def _jax_plugins() -> list[str]:
    try:
        spec = importlib.util.find_spec("jax_plugins")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [m.name for m in pkgutil.iter_modules(list(spec.submodule_search_locations))]


def platforms_without_tpu() -> str | None:
    """The ``jax_platforms`` value to use, or None to leave JAX's own choice."""
    if "JAX_PLATFORMS" in os.environ or any(k in os.environ for k in _TPU_ENV):
        return None
    try:
        if importlib.util.find_spec("libtpu") is None:
            return None
    except (ImportError, ValueError):
        return None
    if _tpu_chip_present():
        return None
    plugins = _jax_plugins()
    if any(not p.startswith("xla_cuda") for p in plugins):  # ROCm or another plugin: not ours to choose
        return None
    gpu = plugins and any(os.path.exists(d) for d in _NVIDIA_DEVICES)
    return "cuda,cpu" if gpu else "cpu"


def apply() -> None:
    value = platforms_without_tpu()
    if value is None:
        return
    os.environ["JAX_PLATFORMS"] = value  # read when jax is imported (and by child processes)
    jax = sys.modules.get("jax")
    if jax is not None:  # imported already: set its config too, unless a backend has started
        try:
            if not jax.config.jax_platforms:
                jax.config.update("jax_platforms", value)
        except Exception:  # noqa: BLE001 - best effort; JAX then prints libtpu's warnings, nothing worse
            pass
