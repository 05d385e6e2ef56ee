"""The fused top-K selection kernel (``kernels/pallas_topk``) and the layer path that uses it (``nn/selection``).

Values in interpret mode against ``ops.topk`` (itself checked against numpy in tests/ops/test_topk.py);
on TPU (compile-only, libtpu) the Mosaic kernel compiles at the 7B shapes, declares one read and one
write of the activations, and a Q-Sparse layer traced under a TPU mesh calls it (``select=auto``), an
XLA one (``select=xla``) does not.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh

from qsparse_jax.errors import ConfigError
from qsparse_jax.kernels import pallas_topk as kt
from qsparse_jax.nn import selection
from qsparse_jax.nn.sharding import activation_sharding
from qsparse_jax.ops.topk import topk_mask, topk_sparsify

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
MUST_HAVE = bool(os.environ.get("CI")) and sys.platform == "linux" and platform.machine() == "x86_64"
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU and not MUST_HAVE, reason="libtpu is not installed (Linux x86-64 only)")


def draw(seed, rows, d, levels, dtype):
    """Normal rows; ``levels`` > 0 rounds them to multiples of 1/levels (few values: many ties)."""
    x = np.random.default_rng(seed).normal(size=(rows, d))
    return jnp.asarray(np.round(x * levels) / levels if levels else x, dtype)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 40), d=st.sampled_from([128, 256, 384]),
       frac=st.floats(0.02, 1.0), dtype=st.sampled_from(["bfloat16", "float32"]), levels=st.sampled_from([0, 3]))
def test_kernel_keeps_exactly_the_top_k_of_every_row(seed, rows, d, frac, dtype, levels):
    """Interpret mode: the kernel's output is ``x ⊙ topk_mask(x)`` exactly, rows not a multiple of the
    block included; ``levels=3`` rounds the input to a few values, so most rows need the tie cut."""
    x = draw(seed, rows, d, levels, dtype)
    k = max(1, int(frac * d))
    y = kt.topk_rows(x, k, block_rows=16, interpret=True)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(jnp.where(topk_mask(x, k), x, 0), np.float32))
    assert y.dtype == x.dtype


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 40), nm=st.sampled_from([(2, 4), (1, 8), (16, 32), (5, 32), (40, 64)]),
       d_blocks=st.sampled_from([1, 2, 3]), dtype=st.sampled_from(["bfloat16", "float32"]), levels=st.sampled_from([0, 2]))
def test_block_kernel_keeps_exactly_n_of_every_m_like_the_xla_path(seed, rows, nm, d_blocks, dtype, levels):
    """Interpret mode, N:M: the kernel's output is ``x ⊙ topk_mask(x, N, block_size=M)`` exactly (the XLA rank
    path), so exactly N per block; ``levels=2`` rounds the input to a few values, so blocks are full of ties."""
    n, m = nm
    d = 128 * d_blocks
    x = draw(seed, rows, d, levels, dtype)
    y = kt.topk_blocks(x, n, m, block_rows=16, interpret=True)
    want = jnp.where(topk_mask(x, n, block_size=m), x, 0)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))
    assert y.dtype == x.dtype
    if not levels:  # no zeros drawn: the kept entries are visible as non-zeros, N in every block
        assert (np.asarray(y, np.float32).reshape(rows, d // m, m) != 0).sum(-1).tolist() == [[n] * (d // m)] * rows


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 12), d=st.sampled_from([100, 128, 384, 1000]),
       frac=st.floats(0.02, 1.0), dtype=st.sampled_from(["bfloat16", "float32"]), levels=st.sampled_from([0, 3]))
def test_gpu_kernel_keeps_exactly_the_top_k_of_every_row(seed, rows, d, frac, dtype, levels):
    """Interpret mode, the Triton form: ``x ⊙ topk_mask(x)`` exactly, rows whose width is not a power of 2
    (padded in registers, masked at load and store) included; ``levels=3`` makes the tie cut matter."""
    x = draw(seed, rows, d, levels, dtype)
    k = max(1, int(frac * d))
    y = kt.topk_rows_gpu(x, k, interpret=True)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(jnp.where(topk_mask(x, k), x, 0), np.float32))


@pytest.mark.parametrize("d", [4096, 11008])
def test_gpu_kernel_lowers_to_triton_at_7b_shapes(d):
    """Lowered for CUDA on this host: one Triton call per selection (not run: no GPU here)."""
    f = jax.jit(lambda x: kt.topk_rows_gpu(x, int(0.7 * d)))
    text = f.trace(jax.ShapeDtypeStruct((64, d), jnp.bfloat16)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1


def test_select_fused_takes_the_gpu_kernel_only_when_asked_and_fails_where_no_kernel_applies(monkeypatch):
    """On a GPU target ``auto`` keeps the XLA search (the Triton kernel has not run on a GPU yet) and ``fused``
    takes the kernel; on CPU ``fused`` is a one-line ConfigError, not a silent XLA fallback."""
    x = jax.random.normal(jax.random.key(0), (4, 100))
    with pytest.raises(ConfigError, match="select=fused: no fused selection kernel for this input on cpu"):
        selection.select_topk(x, 30, select="fused")
    with pytest.raises(ValueError, match="select='fused' needs a fused kernel"):
        topk_sparsify(x, 30, select="fused")  # the XLA layer itself never stands in for a kernel
    monkeypatch.setattr(selection, "target_platform", lambda: "gpu")
    monkeypatch.setattr(selection, "topk_rows_gpu", lambda x, k: kt.topk_rows_gpu(x, k, interpret=True))
    assert not selection.fused_applies(x, None, "none", "ste", "auto")
    assert selection.fused_applies(x, None, "none", "ste", "fused")
    assert not selection.fused_applies(x, 32, "none", "ste", "fused")  # N:M: the TPU kernel only
    y = selection.select_topk(x, 30, select="fused")
    np.testing.assert_array_equal(y, jnp.where(topk_mask(x, 30), x, 0))


def test_block_kernel_rejects_a_block_that_does_not_divide_the_row():
    with pytest.raises(ValueError, match="N:M"):
        kt.topk_blocks(jnp.ones((2, 96)), 2, 64, interpret=True)


def test_fused_path_gradient_is_the_identity(monkeypatch):
    """Eq. 13 through the fused path: the cotangent passes unmasked (kernel run in interpret mode)."""
    monkeypatch.setattr(selection, "topk_rows", lambda x, k: kt.topk_rows(x, k, interpret=True))
    x = jax.random.normal(jax.random.key(0), (8, 128))
    g = jax.random.normal(jax.random.key(1), (8, 128))
    y, vjp = jax.vjp(lambda x: selection._fused_ste(x, 40), x)
    assert int((y != 0).sum(-1).max()) == 40
    np.testing.assert_array_equal(vjp(g)[0], g)


def test_fused_block_path_gradient_is_the_identity(monkeypatch):
    """Eq. 13 for Block Q-Sparse through the fused path: 16 of every 32 kept forward, the cotangent unmasked."""
    monkeypatch.setattr(selection, "topk_blocks", lambda x, n, m: kt.topk_blocks(x, n, m, interpret=True))
    x = jax.random.normal(jax.random.key(0), (8, 128))
    g = jax.random.normal(jax.random.key(1), (8, 128))
    y, vjp = jax.vjp(lambda x: selection._fused_ste(x, 16, 32), x)
    assert (np.asarray(y).reshape(8, 4, 32) != 0).sum(-1).tolist() == [[16] * 4] * 8
    np.testing.assert_array_equal(vjp(g)[0], g)


def test_declared_cost_is_one_read_and_one_write_plus_the_passes():
    c = kt.topk_cost(8192, 4096, jnp.bfloat16)
    assert c.bytes_accessed == 2 * 8192 * 4096 * 2
    assert c.flops == 3 * (15 + 13 + 2) * 8192 * 4096  # 15 value passes (bf16), 13 index passes (0..4096)
    b = kt.blocks_cost(8192, 4096, 32, jnp.bfloat16)
    assert b.bytes_accessed == 2 * 8192 * 4096 * 2 and b.flops == 7 * 31 * 8192 * 4096  # 31 rotations for M = 32


@pytest.fixture(scope="module")
def v5p(tpu_slice):
    return tpu_slice("v5p-8")


@needs_libtpu
@pytest.mark.parametrize("d", [4096, 11008])
def test_mosaic_kernel_compiles_for_v5p_at_7b_shapes_with_its_declared_bytes(v5p, d):
    """8192 rows (4 sequences of 2048 per chip, configs/7b-qsparse.yaml) of bf16: the compiled program
    is the Mosaic call, and the compiler's bytes are the kernel's declared one read + one write."""
    sh = jax.sharding.SingleDeviceSharding(v5p[0])
    c = jax.jit(lambda x: kt.topk_rows(x, int(0.7 * d))).lower(
        jax.ShapeDtypeStruct((8192, d), jnp.bfloat16, sharding=sh)).compile()
    assert "tpu_custom_call" in c.as_text()
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert cost["bytes accessed"] == 2 * 8192 * d * 2


@needs_libtpu
@pytest.mark.parametrize("d", [4096, 11008])
def test_mosaic_block_kernel_compiles_for_v5p_at_7b_shapes_with_its_declared_bytes(v5p, d):
    """16:32 (configs/7b-block.yaml) on 8192 bf16 rows: one Mosaic call, one read + one write of the activations."""
    sh = jax.sharding.SingleDeviceSharding(v5p[0])
    c = jax.jit(lambda x: kt.topk_blocks(x, 16, 32)).lower(
        jax.ShapeDtypeStruct((8192, d), jnp.bfloat16, sharding=sh)).compile()
    assert "tpu_custom_call" in c.as_text()
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert cost["bytes accessed"] == 2 * 8192 * d * 2


@needs_libtpu
@pytest.mark.parametrize("select, calls", [("auto", 1), ("xla", 0)])
def test_a_layer_traced_for_a_tpu_mesh_uses_the_kernel_only_with_select_auto(v5p, select, calls):
    """Under an activation mesh of TPU devices (a slice compiled from this CPU host), ``select=auto``
    lowers to the kernel under shard_map; ``xla`` keeps the XLA search."""
    mesh = Mesh(np.array(v5p[:4]).reshape(4, 1, 1), ("data", "fsdp", "tensor"))
    f = jax.jit(lambda x: selection.select_topk(x, 300, select=select))
    with activation_sharding(mesh):
        text = f.trace(jax.ShapeDtypeStruct((8, 128, 1024), jnp.bfloat16)).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("qsparse_topk_rows") >= calls and (calls or "qsparse_topk_rows" not in text)


@needs_libtpu
@pytest.mark.parametrize("select, calls", [("auto", 1), ("xla", 0)])
def test_a_block_layer_traced_for_a_tpu_mesh_uses_the_block_kernel_only_with_select_auto(v5p, select, calls):
    """Block Q-Sparse (16:32) under a TPU activation mesh: ``auto`` lowers to the N:M kernel, ``xla`` does not."""
    mesh = Mesh(np.array(v5p[:4]).reshape(4, 1, 1), ("data", "fsdp", "tensor"))
    f = jax.jit(lambda x: selection.select_topk(x, 16, block_size=32, select=select))
    with activation_sharding(mesh):
        text = f.trace(jax.ShapeDtypeStruct((8, 128, 1024), jnp.bfloat16)).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("qsparse_topk_blocks") >= calls and (calls or "qsparse_topk_blocks" not in text)
