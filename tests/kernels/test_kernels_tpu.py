"""The Pallas kernels compile for TPU v5e and v5p through Mosaic, on this CPU machine, for the 7B shapes.

libtpu (the ``tpu`` extra, part of ``dev``) describes a TPU chip (``jax.experimental.topologies``);
``jax.jit(...).lower(ShapeDtypeStruct on that device).compile()`` then runs the real TPU compiler,
Mosaic included, so a block shape or an op the chip cannot do fails here, not on a rented pod.
Lowering alone (``tests/test_kernels.py``, which also covers the GPU Triton path) checks much less.

Shapes (``configs/7b-*.yaml``: dim 4096, hidden 11008, 32 heads without GQA): q/k/v/o 4096→4096,
gate/up 4096→11008, down 11008→4096. Decode: one sequence, one token per step (``generate``), and 8
sequences (the decode kernel that copies only the kept rows by DMA: ``test_tpu_decode.py``). Prefill:
8 prompts × 256 tokens = 2048 rows. Also here: no relayout copies around the kernel (issue 20 item 4) and
its declared ``cost_estimate`` against a count by hand (item 1).

Marker ``libtpu``: skipped with the reason where libtpu is not installed (it has Linux x86-64 wheels
only); in CI (``CI`` set) on Linux x86-64 a missing libtpu fails instead, since ``dev`` installs it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import pytest

from qsparse_jax.kernels import PackedTernary, qsparse_matmul
from qsparse_jax.kernels import pallas as kp
from qsparse_jax.testing.fixtures import on_device
from qsparse_jax.kernels import reference as ref
from qsparse_jax.kernels.packing import packed_columns
from qsparse_jax.train.topology import chip_of

ROOT = Path(__file__).resolve().parents[2]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
CHIPS = ("v5e", "v5p")  # the chips of the tpu fixture (tests/kernels/conftest.py)
MUST_HAVE = bool(os.environ.get("CI")) and sys.platform == "linux" and platform.machine() == "x86_64"

pytestmark = [pytest.mark.libtpu,
              pytest.mark.skipif(not HAS_LIBTPU and not MUST_HAVE,
                                 reason="libtpu is not installed (pip install -e '.[tpu]'; Linux x86-64 only)")]

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
DECODE, DECODE_BATCH, PREFILL = 1, 8, 8 * 256
KEEP = 0.7  # configs/7b-qsparse.yaml, 7b-bitnet-qsparse.yaml


def _compile(f, *args):
    """Lower and compile for the TPU device the arguments sit on. Some Mosaic lowering rules (``sign``,
    1-D blocks) look the chip up from the default device, so that is the TPU device too."""
    t0 = time.perf_counter()
    device = next(iter(jax.tree.leaves(args)[0].sharding.device_set))
    with jax.default_device(device):
        lowered = jax.jit(f).lower(*args)
    assert "tpu_custom_call" in lowered.as_text()  # the Pallas kernel, not an XLA fallback
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t0


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("tokens", [DECODE, PREFILL], ids=["decode", "prefill"])
@pytest.mark.parametrize("d,n", SHAPES, ids=[f"{d}x{n}" for d, n in SHAPES])
def test_matmul_kernel_compiles_for_tpu(tpu, chip, tokens, d, n):
    dev = tpu[chip]
    assert chip_of(dev).name == f"TPU {chip}"  # "TPU v5 lite" is a v5e, "TPU v5" a v5p
    c = -(-n // 4)
    f = functools.partial(kp.matmul, bits=2, target="tpu")
    compiled, sec = _compile(f, on_device(dev, (tokens, d), jnp.int8), on_device(dev, (d, c), jnp.uint8))
    mem = compiled.memory_analysis()
    assert mem.argument_size_in_bytes >= d * c  # the packed weight is an argument, read in place
    assert mem.output_size_in_bytes >= 4 * tokens * c * 4  # int32 planes [4, M, C]
    assert sec < 60


@pytest.mark.parametrize("chip", CHIPS)
def test_base3_packing_kernel_compiles_for_tpu(tpu, chip):
    dev = tpu[chip]
    c = -(-11008 // 5)
    f = functools.partial(kp.matmul, bits=1.6, target="tpu")
    _compile(f, on_device(dev, (DECODE_BATCH, 4096), jnp.int8), on_device(dev, (4096, c), jnp.uint8))


@pytest.mark.parametrize("chip,tokens", [("v5e", DECODE), ("v5e", DECODE_BATCH), ("v5e", 512), ("v5p", DECODE),
                                         ("v5p", DECODE_BATCH)],  # v5p at 512 rows: 16 s of XLA time in top-K
                         ids=["v5e-decode1", "v5e-decode8", "v5e-prefill512", "v5p-decode1", "v5p-decode8"])
def test_qsparse_matmul_compiles_for_tpu_end_to_end(tpu, chip, tokens):
    """top-K (keep 70 %) → int8 → Mosaic kernel → scales, as ``qsparse_matmul(impl="pallas")`` runs on a TPU
    (the backend check is pointed at the TPU: this process's own backend is the CPU)."""
    dev = tpu[chip]
    d, n = 4096, 11008
    w = PackedTernary(on_device(dev, (d, -(-n // 4)), jnp.uint8), on_device(dev, (), jnp.float32), n, 2)
    k = int(KEEP * d)
    with mock.patch.object(jax, "default_backend", lambda: "tpu"):
        compiled, _ = _compile(lambda x, w: qsparse_matmul(x, w, k=k, impl="pallas"),
                               on_device(dev, (tokens, d), jnp.bfloat16), w)
    out = compiled.memory_analysis().output_size_in_bytes
    assert out == tokens * n * 4  # float32 [tokens, out]


def test_libtpu_without_a_tpu_chip_is_silent_and_uses_the_cpu():
    """With libtpu installed and JAX_PLATFORMS unset, JAX alone tries the TPU runtime and prints a page of
    libtpu warnings; importing qsparse_jax first (train.py, every CLI) skips it (qsparse_jax/_quiet_tpu.py)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
    code = "import qsparse_jax, jax; print(jax.default_backend())"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0 and p.stdout.strip() == "cpu", p.stderr[-2000:]
    assert p.stderr == "", p.stderr[-2000:]
    # jax imported before qsparse_jax: still no TPU start (the config is set, no backend has started)
    code = "import jax, qsparse_jax; print(jax.default_backend())"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.stdout.strip() == "cpu" and p.stderr == "", p.stderr[-2000:]
    # a user's explicit choice wins
    p = subprocess.run([sys.executable, "-c", "import qsparse_jax, os; print(os.environ['JAX_PLATFORMS'])"],
                       env=dict(env, JAX_PLATFORMS="cpu,tpu"), capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "cpu,tpu"


def _projection(n):
    """The layer as the kernel path computes it: absmax int8 (dense: top-K changes no layout) → Mosaic
    kernel → plane-major accumulator to columns → both scales."""
    def f(x, data, scale):
        q, s = ref.quantize_input(x, None)
        acc = kp.matmul(q, data, bits=2, target="tpu")
        return ref.scale_output(kp.planes_to_columns(acc, n), s, scale)
    return f


def _relayouts(text, weight):
    """Ops of the compiled program that rewrite the weight in another layout (fusions included; a copy into
    another memory space with the same tiling, XLA's prefetch into VMEM at prefill, is not one), and pads
    (of the activations: the only padded operands a projection could have)."""
    made = re.findall(rf"= {re.escape(weight)}\{{([^}}]*)\}} ([\w-]+)\(", text)
    layout = {lay for lay, op in made if op == "parameter"}
    strip = lambda lay: re.sub(r"S\(\d+\)", "", lay)
    rewrites = [op for lay, op in made if op != "parameter" and strip(lay) not in {strip(p) for p in layout}]
    return rewrites, re.findall(r"= (\w+\[[\d,]*\])\S* pad\(", text)


@pytest.mark.parametrize("unit,align", [(jnp.uint32, 128), (jnp.uint8, 128), (jnp.uint8, 1)],
                         ids=["words", "bytes-aligned", "bytes-unaligned"])
@pytest.mark.parametrize("tokens", [DECODE, PREFILL], ids=["decode", "prefill"])
@pytest.mark.parametrize("d,n", [(4096, 11008), (11008, 4096)], ids=["4096x11008", "11008x4096"])
def test_no_relayout_copies_around_the_kernel(tpu, unit, align, tokens, d, n):
    """Issue 20 item 4, on the compiled v5p program: with packed columns a multiple of 128 the weight reaches the
    custom call as stored (XLA gives u8[4096,2752] a column-major layout and copies it before every call — the
    unaligned case shows the check finds that), and the default reduction tile divides 11008, so the int8
    activations are not padded (they were to 11264)."""
    dev = tpu["v5p"]
    c = packed_columns(n, 2, unit, align)
    weight = f"{jnp.dtype(unit).name[0]}{jnp.dtype(unit).itemsize * 8}[{d},{c}]"
    compiled, _ = _compile(_projection(n), on_device(dev, (tokens, d), jnp.bfloat16), on_device(dev, (d, c), unit),
                           on_device(dev, (), jnp.float32))
    text = compiled.as_text()
    call = re.search(r"custom-call\(([^)]*)\), custom_call_target=\"tpu_custom_call\"", text).group(1)
    rewrites, pads = _relayouts(text, weight)
    assert not pads
    if align == 1 and c % 128:
        assert "copy" in rewrites and "%copy" in call  # what issue 20 saw
    else:
        entry = text[text.index("ENTRY"):]
        param = re.search(rf"(%\S+) = {re.escape(weight)}\S* parameter\(1\)", entry).group(1)
        operand = call.split(", ")[1]  # the parameter itself, or its prefetch into VMEM (same layout)
        assert not rewrites and (operand == param or re.search(rf"{re.escape(operand)} = \S+ copy-done", text))


def test_matmul_declares_the_bytes_it_moves(tpu):
    """Issue 20 item 1 (TPU): XLA's cost analysis of the compiled kernel is its declared estimate, and that equals a
    count by hand for the 4096→11008 projection at 2048 tokens in words: 128-token × 512-feature activation tiles
    read once per 128-word column tile (6), the weight once per token tile (16), the int32 planes written once."""
    dev = tpu["v5p"]
    m, d, c = 2048, 4096, 768
    f = functools.partial(kp.matmul, bits=2, target="tpu")
    compiled, _ = _compile(f, on_device(dev, (m, d), jnp.int8), on_device(dev, (d, c), jnp.uint32))
    cost = compiled.cost_analysis()
    by_hand = 6 * m * d + 16 * d * c * 4 + 16 * m * c * 4
    assert cost["bytes accessed"] == by_hand == kp.matmul_bytes(m, d, c, 4)["total"]
    assert cost["flops"] == 2 * m * d * 16 * c
