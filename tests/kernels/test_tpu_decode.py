"""The TPU decode kernel (``kernels/pallas_tpu_decode.py``): copies only the kept rows, equals the reference.

Values: the kernel runs in interpret mode on this CPU, on random inputs, its output buffer poisoned
first (a share or step it never writes shows), and the weight rows no token keeps overwritten with
random words (a row it reads that it should not shows). Bytes: counted from the kernel's own DMA
descriptors (the shapes in its jaxpr) and checked against ``copied_bytes``, which is its declared
``cost_estimate``, and against the bound of issue 20 at the 7B decode shapes. Compiles: for TPU v5e
and v5p through Mosaic (marker ``libtpu``, as ``test_kernels_tpu.py``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse_jax.kernels import pack_ternary
from qsparse_jax.kernels import pallas as kp
from qsparse_jax.testing.fixtures import on_device
from qsparse_jax.kernels import pallas_tpu_decode as dk
from qsparse_jax.kernels import reference as ref
from qsparse_jax.kernels.packing import packed_columns, tpu_layout

# |acc| ≤ 128·D, so never a real accumulator; not −2^31, whose double wraps to 0: XLA adds the two shares' buffers
SENTINEL = 987_654_321
SHAPES_7B = [(4096, 4096), (4096, 11008), (11008, 4096)]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
CHIPS = ("v5e", "v5p")  # the chips of the tpu fixture (tests/kernels/conftest.py)
MUST_HAVE = bool(os.environ.get("CI")) and sys.platform == "linux" and platform.machine() == "x86_64"
libtpu = [pytest.mark.libtpu, pytest.mark.skipif(not HAS_LIBTPU and not MUST_HAVE, reason="libtpu is not installed "
                                                 "(pip install -e '.[tpu]'; Linux x86-64 only)")]


def _compile(f, *args):
    """Lower (with the TPU device as the default device: some Mosaic rules look the chip up there) and compile."""
    t0 = time.perf_counter()
    with jax.default_device(next(iter(args[0].sharding.device_set))):
        lowered = jax.jit(f).lower(*args)
    return lowered.compile(), time.perf_counter() - t0


def _case(seed, m, d, n, k, bits, rows=None):
    rng = np.random.default_rng(seed)
    w = tpu_layout(pack_ternary(jnp.asarray(rng.normal(size=(d, n)).astype(np.float32)), bits))
    q, _ = ref.quantize_input(jnp.asarray(rng.normal(size=(m, d)).astype(np.float32)), k)
    idx, count = ref.kept_rows(q, rows or min(d, m * k))
    return rng, w, q, idx, count, ref.gather_columns(q, idx, count)


def _decode(w, idx, count, qg, data=None):
    m, c = qg.shape[0], w.data.shape[1]
    poison = jnp.full((dk.SPLITS, w.planes, m, c), SENTINEL, jnp.int32)
    acc = kp.gather_matmul(count[None], idx, qg, w.data if data is None else data, bits=w.bits, target="tpu",
                           interpret=True, out_init=poison)
    return kp.planes_to_columns(acc, w.out_features)


@pytest.mark.parametrize("bits,m,k", [(2, 8, 100), (1.6, 3, 60)])
def test_interpret_equals_reference_reading_only_kept_rows(bits, m, k):
    """A bound of 300 rows: each share gets two steps of 128 (rows 0–255, 256–511). 2 bit: 8 tokens keep 100
    of 300, a union of ~290 rows: two steps of the first share (double buffering), one of the second.
    1.6 bit: 3 tokens keep 60, ~150 rows: two steps of the first share, none of the second, which must
    still write its zeros over the poison. Rows no token keeps are overwritten with random words first:
    reading one changes the result."""
    rng, w, q, idx, count, qg = _case(2, m, 300, 150, k, bits, rows=300)
    assert dk.padded_rows(300) == 2 * dk.BK * dk.SPLITS
    assert (dk.BK * dk.SPLITS < int(count) < 300) if bits == 2 else (dk.BK < int(count) <= dk.BK * dk.SPLITS)
    kept = np.asarray(jnp.any(q != 0, axis=0))
    noise = rng.integers(0, 2**32, w.data.shape, dtype=np.uint64).astype(np.uint32)
    data = jnp.where(jnp.asarray(kept)[:, None], w.data, jnp.asarray(noise))
    assert not np.array_equal(data, w.data)
    np.testing.assert_array_equal(_decode(w, idx, count, qg, data), ref.accumulate_reference(q, w))


def _dma_copies(jaxpr):
    """(source memory space, copied shape, dtype) of every DMA a kernel jaxpr starts, nested jaxprs included."""
    found = []
    for e in jaxpr.eqns:
        if e.primitive.name == "dma_start":
            src = jax.tree.unflatten(e.params["tree"], e.invars)[0]  # a ref with its indexers
            aval = src.ref.aval
            found.append((str(aval.memory_space), tuple(src.transforms[-1].get_indexer_shape()), aval.dtype))
        for v in e.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += _dma_copies(sub)
    return found


def _pallas_calls(jaxpr):
    found = []
    for e in jaxpr.eqns:
        if e.primitive.name == "pallas_call":
            found.append(e)
            continue
        for v in e.params.values():
            sub = getattr(v, "jaxpr", v)
            if hasattr(sub, "eqns"):
                found += _pallas_calls(sub)
    return found


def _pallas_eqn(f, *args):
    eqns = _pallas_calls(jax.make_jaxpr(f)(*args).jaxpr)
    assert len(eqns) == 1
    return eqns[0]


@pytest.mark.parametrize("d,n", SHAPES_7B, ids=[f"{d}x{n}" for d, n in SHAPES_7B])
def test_bytes_from_the_dmas_and_the_declared_cost(d, n):
    """The kernel's weight DMAs each copy one [1, C] word row (read from its jaxpr); ``copied_bytes`` counts
    one per kept row and is the declared cost_estimate; with keep 30/40/70 % at batch 1 it is within 1.1 ×
    (kept fraction × packed weight) plus activations and output, and 1.1 × that of the 2-bit bytes weight
    with columns padded to 128 as well."""
    c = packed_columns(n, 2, jnp.uint32, 128)
    for keep in (0.3, 0.4, 0.7):
        k = int(keep * d)
        args = (jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((k,), jnp.int32),
                jax.ShapeDtypeStruct((1, k), jnp.int8), jax.ShapeDtypeStruct((d, c), jnp.uint32))
        eqn = _pallas_eqn(functools.partial(kp.gather_matmul, bits=2, target="tpu"), *args)
        copies = _dma_copies(eqn.params["jaxpr"])
        assert copies and set(copies) == {("hbm", (1, c), jnp.dtype(jnp.uint32))}  # only whole word rows, from HBM
        got = dk.copied_bytes(k, 1, c)
        assert got["weight"] == k * c * 4  # one row DMA per kept feature
        assert eqn.params["cost_estimate"].bytes_accessed == got["total"]
        rest = got["total"] - got["weight"]
        assert rest == got["activations"] + got["indices"] + got["output"]
        assert got["total"] <= 1.1 * (k / d) * (d * c * 4) + rest
        assert got["weight"] <= 1.1 * (k / d) * (d * packed_columns(n, 2, jnp.uint8, 128))  # bytes layout, 2 bit
    # one figure by hand: 4096→11008, keep 40 %: 1638 rows of 768 words; activations padded to 7 steps of
    # 256; idx + count; two shares of 16 planes × 1 token × 768 int32
    if (d, n) == (4096, 11008):
        assert dk.copied_bytes(1638, 1, 768)["total"] == 1638 * 3072 + 1792 + 4 * 1793 + 2 * 16 * 768 * 4


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("tokens", [1, 8])
@pytest.mark.parametrize("d,n", SHAPES_7B, ids=[f"{d}x{n}" for d, n in SHAPES_7B])
@libtpu[0]
@libtpu[1]
def test_compiles_for_tpu_at_7b_decode_shapes(tpu, chip, tokens, d, n):
    """Mosaic compiles the kernel (DMAs, semaphores, scalar prefetch) for a v5e chip and a v5p device; the weight
    reaches it as it is stored (no copy), and XLA's cost analysis reports the declared bytes."""
    dev = tpu[chip]
    k = int(0.7 * d)
    r = min(d, tokens * k)  # the union bound the decode path passes
    c = packed_columns(n, 2, jnp.uint32, 128)
    f = functools.partial(kp.gather_matmul, bits=2, target="tpu")
    compiled, sec = _compile(f, on_device(dev, (1,), jnp.int32), on_device(dev, (r,), jnp.int32),
                             on_device(dev, (tokens, r), jnp.int8), on_device(dev, (d, c), jnp.uint32))
    text = compiled.as_text()
    assert "qsparse_tpu_decode_kept_rows" in text
    weight = f"u32[{d},{c}]"
    assert all(" parameter(" in line for line in text.splitlines() if f"= {weight}" in line)  # never copied
    assert compiled.cost_analysis()["bytes accessed"] >= dk.copied_bytes(r, tokens, c)["total"]
    assert sec < 60


@libtpu[0]
@libtpu[1]
def test_base3_words_compile_for_tpu(tpu):
    dev = tpu["v5p"]
    c = packed_columns(11008, 1.6, jnp.uint32, 128)
    assert c == 640  # 20 base-3 values per word
    f = functools.partial(kp.gather_matmul, bits=1.6, target="tpu")
    _compile(f, on_device(dev, (1,), jnp.int32), on_device(dev, (1638,), jnp.int32), on_device(dev, (1, 1638), jnp.int8),
             on_device(dev, (4096, c), jnp.uint32))


def test_tpu_entry_sends_words_to_the_dma_kernel_and_bytes_to_the_gathered_batched_kernel():
    """``pallas.gather_matmul(target="tpu")``: words → this kernel (lowered for TPU); bytes (a byte row cannot be a
    DMA) → XLA's row gather and the batched kernel, which must equal the reference too (interpret mode)."""
    _, w, q, idx, count, qg = _case(3, 2, 200, 70, 30, 2)
    f = functools.partial(kp.gather_matmul, bits=2, target="tpu")
    text = jax.jit(f).trace(count[None], idx, qg, w.data).lower(lowering_platforms=("tpu",)).as_text()
    assert "qsparse_tpu_decode_kept_rows" in text
    b = pack_ternary(jnp.asarray(np.random.default_rng(3).normal(size=(200, 70)).astype(np.float32)), 2)
    np.testing.assert_array_equal(ref.accumulate_reference(q, b), ref.accumulate_reference(q, w))  # same weight
    poison = jnp.full((4, 16, b.data.shape[1]), SENTINEL, jnp.int32)
    acc = kp.gather_matmul(count[None], idx, qg, b.data, bits=2, target="tpu", interpret=True, out_init=poison)
    np.testing.assert_array_equal(kp.planes_to_columns(acc, 70), ref.accumulate_reference(q, b))
    with pytest.raises(ValueError, match="tpu_layout") as e:  # the kernel itself refuses bytes, in one line
        dk.gather_matmul(count[None], idx, qg, b.data, bits=2)
    assert "\n" not in str(e.value)
