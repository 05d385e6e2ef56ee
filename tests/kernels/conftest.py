"""Shared by the TPU compile-only kernel tests: the devices of a TPU slice, described by libtpu."""

from __future__ import annotations

import importlib.util
import os

import pytest

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
SLICES = {"v5e": "v5e-1", "v5p": "v5p-8"}  # one v5e chip; the smallest v5p slice (4 chips), one used


@pytest.fixture(scope="session")
def tpu_slice():
    """``name -> devices`` of that TPU slice (compile-only; nothing runs). ``tpu_devices`` sets libtpu's
    off-a-TPU-VM variables: they are kept out of the other tests. Fails (not skips) without libtpu: the
    tests that use it carry their own skip marker for machines that cannot install it."""
    cache: dict = {}

    def devices(name: str) -> list:
        if not HAS_LIBTPU:
            pytest.fail("libtpu is missing in CI on Linux x86-64: the dev extra installs it (jax[tpu])")
        if name not in cache:
            from qsparse_jax.train.topology import tpu_devices

            saved = dict(os.environ)
            try:
                cache[name] = tpu_devices(name)[0]
            finally:
                os.environ.clear()
                os.environ.update(saved)
        return cache[name]

    return devices


@pytest.fixture(scope="module")
def tpu(tpu_slice):
    """chip name (``SLICES``) -> one TPU device of that generation (compile-only; nothing runs)."""
    return {chip: tpu_slice(name)[0] for chip, name in SLICES.items()}
