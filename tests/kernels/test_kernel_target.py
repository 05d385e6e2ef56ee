"""The kernel path is the target's, not the host's: a TPU slice compiled from this CPU host gets Mosaic.

``kernels.qsparse_matmul(impl="auto" | "pallas")`` chooses its form with ``lax.platform_dependent``, so
the platform the program is lowered for decides (``jax.default_backend()`` is the CPU here). The
compile-only decode report (``train.aot.decode_report``, ``qsparse generate --compile_only``) names what
was compiled, and options that cannot apply are one-line errors.

TPU tests: marker ``libtpu`` as in ``test_kernels_tpu.py`` (skipped where libtpu is not installed,
a failure in CI on Linux x86-64).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import platform
import sys

import jax
import jax.numpy as jnp
import pytest

from qsparse_jax.cli.generate import main as generate_main
from qsparse_jax.config import load_config
from qsparse_jax.errors import ConfigError
from qsparse_jax.kernels import pack_ternary, qsparse_matmul
from qsparse_jax.nn.sharding import make_mesh
from qsparse_jax.train.aot import (
    PROJECTION_KERNELS,
    PROJECTIONS,
    _cost,
    _is_projection_weight,
    _names,
    compile_decode_step,
    decode_params,
    decode_programs,
    decode_report,
    format_decode_report,
    kernel_calls,
    must_read_bytes,
)

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
MUST_HAVE = bool(os.environ.get("CI")) and sys.platform == "linux" and platform.machine() == "x86_64"
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU and not MUST_HAVE,
                                  reason="libtpu is not installed (pip install -e '.[tpu]'; Linux x86-64 only)")
MOSAIC = 'custom_call_target="tpu_custom_call"'  # in compiled HLO text
MOSAIC_LOWERED = "stablehlo.custom_call @tpu_custom_call"  # in lowered StableHLO text
# the tiny config, 1.58-bit, one small layer: 7 projections (q, k, v, o, gate, up, down)
SMALL = ["model.weight_bits=1.58", "model.act_bits=8", "model.n_layers=1", "model.dim=128", "model.hidden_dim=256",
         "model.n_heads=2"]


def _cfg(kernels: str, *extra: str):
    cfg = load_config("configs/tiny.yaml", SMALL + list(extra))
    return dataclasses.replace(cfg, model=cfg.model.replace(kernels=kernels))


@pytest.fixture(scope="module")
def v5e8(tpu_slice):
    """The 8 devices of a TPU v5e-8 slice (compile-only)."""
    return tpu_slice("v5e-8")


@pytest.mark.libtpu
@needs_libtpu
@pytest.mark.parametrize("kernels", ["on", "off"])
def test_tpu_decode_compiled_from_a_cpu_host_has_the_mosaic_kernels_only_with_kernels_on(v5e8, kernels):
    """A v5e-8 slice (8 devices: the kernels sit in shard_map) compiled from this CPU host."""
    assert jax.default_backend() == "cpu"
    cfg = _cfg(kernels)
    _, dec, _, _ = decode_programs(cfg.model, make_mesh(cfg.mesh, v5e8), 1, 8, 4, prefill=False)
    text = dec.as_text()
    projection_calls = sum(n for name, n in kernel_calls(text)["names"].items()
                           if any(part in name for part in PROJECTION_KERNELS))
    if kernels == "on":
        assert MOSAIC in text
        assert projection_calls == 7  # one int8 x ternary kernel per projection of the decode step
        # every projection keeps 70 %: each is the kernel that DMAs only the kept rows of the packed words
        assert kernel_calls(text)["names"].get("qsparse_tpu_decode_kept_rows") == 7
    else:
        assert projection_calls == 0  # (other Pallas kernels, e.g. the top-K selection, may be there)


@pytest.mark.libtpu
@needs_libtpu
def test_decode_packs_words_for_a_tpu_mesh_and_bytes_for_a_cpu_one(v5e8):
    """The TPU decode kernel copies whole 32-bit rows by DMA and the batched kernel reads a row-major weight
    only with columns a multiple of 128 (``packing.tpu_layout``): a TPU mesh gets that layout, CPU bytes."""
    cfg = _cfg("on")
    packed = lambda params: [a for p, a in jax.tree_util.tree_leaves_with_path(params)
                             if "packed" in jax.tree_util.keystr(p) and a.ndim == 2]
    tpu = packed(decode_params(cfg.model, make_mesh(cfg.mesh, v5e8), 2)[1])
    cpu = packed(decode_params(cfg.model, make_mesh(cfg.mesh, jax.devices()[:1]), 2)[1])
    assert len(tpu) == len(cpu) == 7
    assert all(a.dtype == jnp.uint32 and a.shape[1] % 128 == 0 for a in tpu)
    assert all(a.dtype == jnp.uint8 for a in cpu)


@pytest.mark.libtpu
@needs_libtpu
def test_v5p_decode_step_reads_packed_weights_in_place_and_has_a_time_estimate(tpu_slice):
    """The kept-row kernel gets its weight in HBM: XLA may not prefetch it whole into VMEM (a copy to memory
    space S(1) reads every row), and the kept-row list is built on the TensorCore: ``jnp.nonzero``'s scatter
    would go to the v5p SparseCore, which XLA's cost model leaves without a time and counts at 34 MB for
    one 4096-wide row. Seven projections of one small layer on v5p-8, batch 1."""
    cfg = _cfg("on")
    mesh = make_mesh(cfg.mesh, tpu_slice("v5p-8"))
    packed = {f"u32[{a.shape[0]},{a.shape[1]}]" for p, a in jax.tree_util.tree_leaves_with_path(
        decode_params(cfg.model, mesh, 2)[1]) if "packed" in jax.tree_util.keystr(p) and a.ndim == 2}
    compiled = compile_decode_step(cfg.model, mesh, 1, 12, 2)
    text = compiled.as_text()
    assert kernel_calls(text)["names"].get("qsparse_tpu_decode_kept_rows") == 7 and packed
    in_vmem = [line for line in text.splitlines() for w in packed if f"{w}{{" in line and "S(1)}" in line]
    assert not in_vmem, in_vmem[:2]
    assert "sparsecore" not in text
    cost = _cost(compiled)
    assert cost["seconds"] > 0


def test_auto_lowers_to_the_target_platform_form():
    """One traced program: lowered for TPU it calls Mosaic, lowered for CPU it is plain XLA."""
    w = pack_ternary(jax.random.normal(jax.random.key(0), (256, 384)))
    x = jax.random.normal(jax.random.key(1), (1, 256))
    traced = jax.jit(lambda x, w: qsparse_matmul(x, w, k=128)).trace(x, w)
    assert MOSAIC_LOWERED in traced.lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" not in traced.lower(lowering_platforms=("cpu",)).as_text()


def test_pallas_lowered_for_cpu_is_a_one_line_error():
    w = pack_ternary(jax.random.normal(jax.random.key(0), (128, 64)))
    traced = jax.jit(lambda x, w: qsparse_matmul(x, w, k=32, impl="pallas")).trace(jnp.ones((1, 128)), w)
    assert MOSAIC_LOWERED in traced.lower(lowering_platforms=("tpu",)).as_text()
    with pytest.raises(ValueError, match=r"impl='pallas' needs a gpu or tpu target, this program is compiled "
                                         r"for cpu") as e:
        traced.lower(lowering_platforms=("cpu",))
    assert "\n" not in str(e.value)


def test_kernel_calls_reads_declared_costs_and_counts_opaque_calls():
    declared = ('  %qsparse_int8_ternary_matmul.1 = s32[4,1,128] custom-call(%a, %b), '
                'custom_call_target="tpu_custom_call", backend_config={"custom_call_config":{"body":"TUzv",'
                '"cost_estimate":{"flops":"1000","transcendentals":"0","bytes_accessed":"2048",'
                '"remote_bytes_transferred":"0"}}}')
    opaque = ('  ROOT %qsparse_topk_rows = s32[1,128] custom-call(%a), custom_call_target="tpu_custom_call", '
              'backend_config={}')
    other = '  %c = f32[8] custom-call(%a), custom_call_target="Sharding"'
    r = kernel_calls("\n".join([declared, opaque, other, declared]))
    assert (r["calls"], r["declared"], r["flops"], r["bytes"]) == (3, 2, 2000.0, 4096.0)
    assert r["kind"] == "Pallas TPU kernels (Mosaic)"
    assert r["names"] == {"qsparse_int8_ternary_matmul": 2, "qsparse_topk_rows": 1}


def test_must_read_counts_the_packed_weights_not_the_float_ones():
    """Kernels on, batch 1, one layer, one CPU device: packed weights (in × out/4 bytes) replace the float
    ones; the embedding is one row; every other parameter whole; the KV cache at its mean length."""
    cfg = _cfg("on")
    m = cfg.model
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    _, params = decode_params(m, mesh, 2)
    cache = [{"k": jax.ShapeDtypeStruct((1, 12, m.kv_heads, m.head_size), jnp.float32),
              "v": jax.ShapeDtypeStruct((1, 12, m.kv_heads, m.head_size), jnp.float32),
              "index": jax.ShapeDtypeStruct((), jnp.int32)}]
    r = must_read_bytes(m, params, cache, 1, 8, 4)
    d, h, v = m.dim, m.hidden_dim, m.vocab_size
    packed = 4 * d * (d // 4) + 2 * d * (h // 4) + h * (d // 4) + 7 * 4  # data + one float32 scale each
    rest = 4 * (d + v * d) + 3 * 4 * d  # embedding row, LM head, final norm, two block norms
    kv = (8 + 4 / 2) / 12 * 2 * 12 * m.kv_heads * m.head_size * 4
    assert r["all"] == pytest.approx(packed + rest + kv)
    keep = 1 - 0.3  # every group keeps 70 %: the kept rows share of each packed weight (not of the scales)
    assert r["kept"] == pytest.approx(r["all"] - (1 - keep) * (packed - 7 * 4), rel=1e-3)


def test_packed_copy_carries_no_float_weight_and_still_counts_as_the_projection():
    """``pack_for_inference`` drops each packed projection's float weight (16x its 2-bit words in float32);
    the report's "N of M projections" counts the packed copies instead (it read "224 of 0" once)."""
    on, off = _cfg("on"), _cfg("off")
    mesh = make_mesh(on.mesh, jax.devices()[:1])
    names = lambda params: [_names(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    packed, plain = names(decode_params(on.model, mesh, 2)[1]), names(decode_params(off.model, mesh, 2)[1])
    assert not any(n[-1] == "weight" and n[-2] in PROJECTIONS for n in packed)
    assert sum(map(_is_projection_weight, packed)) == sum(map(_is_projection_weight, plain)) == 7


def test_report_says_what_the_estimate_leaves_out():
    r = {"topology": "v5e-8", "devices": 8, "chip": "TPU v5e", "mesh": {"data": 8}, "batch": 1, "prompt_len": 8,
         "new_tokens": 4, "compiled": "Pallas TPU kernels (Mosaic) in 7 of 7 projections per decode step",
         "sparsity": {"qkv": 0.3}, "block_size": None, "params_bytes_per_device": 2**20, "prefill_peak_bytes": 2**20,
         "decode_peak_bytes": 2**20, "hbm_bytes": 2**34, "fits": True, "decode_seconds_estimate": 2e-3,
         "decode_tokens_per_s_estimate": 500.0, "step_compile_seconds": 1.0, "decode_bytes_accessed": 2**30,
         "decode_flops": 1e9, "hbm_bytes_per_s": 1e12, "must_read_bytes": 2**30, "roofline_seconds": 1e-3,
         "must_read_kept_bytes": 2**29, "roofline_kept_seconds": 5e-4, "kernel_calls": 7, "kernel_calls_declared": 4,
         "kernel_calls_by_name": {"qsparse_int8_ternary_matmul": 7},
         "kernel_declared_bytes": 2**29, "kernel_declared_flops": 0.0, "compile_seconds": 1.0}
    text = format_decode_report(r, "tiny")
    assert "compiled: Pallas TPU kernels (Mosaic) in 7 of 7 projections" in text
    assert "compiler's estimate 2.000 ms -> 500 tokens/s; 1.00 GiB accessed per device (1.074 ms at HBM" in text
    assert "+ KV cache 1.00 GiB -> 1.000 ms (estimate 2.00x, bytes 1.07x)" in text
    assert "kept rows only (top-K, batch 1) 0.50 GiB -> 0.500 ms (estimate 4.00x, bytes 2.15x)" in text
    assert "(pl.CostEstimate, 4 of 7 calls): 50 % of the step's bytes, 0 % of its FLOPs; their bytes at HBM " \
           "bandwidth are 27 % of the time estimate" in text
    assert "the estimate excludes 3 opaque kernel calls" in text
    assert "Pallas kernel calls per decode step: qsparse_int8_ternary_matmul 7" in text
    assert "opaque" not in format_decode_report(dict(r, kernel_calls_declared=7), "tiny")


def test_kernels_pallas_for_cpu_devices_is_an_error_before_compiling():
    with pytest.raises(ConfigError, match="kernels 'pallas' needs a TPU or GPU target, this compiles for 1 cpu"):
        decode_report(_cfg("pallas"), None, 1, 8, 4, devices=jax.devices()[:1])


@pytest.mark.parametrize("argv,message", [
    (["--bits", "1.6"], "--bits 1.6 sets the packed weight format of the kernels, and this model decodes with "
                        "kernels off (add --kernels on)"),
    (["--prompt", "hello", "--repeats", "2"], "--prompt, --repeats go with a run, not --compile_only"),
    (["--kernels", "on", "model.weight_bits=null"], "model.kernels needs a 1.58-bit model"),
    (["--kernels", "on", "model.lte.enabled=true"], "an LTE model decodes with its own sparsity and kernels off"),
])
def test_compile_only_options_that_cannot_apply_are_one_line_errors(capsys, argv, message):
    rc = generate_main(["--config", "configs/tiny.yaml", "--compile_only", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_prompt_len_without_compile_only_is_an_error(capsys):
    assert generate_main(["--config", "configs/tiny.yaml", "--prompt_len", "32"]) == 2
    assert "--prompt_len go with --compile_only" in capsys.readouterr().err
