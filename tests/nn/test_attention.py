"""Attention implementations agree with the reference, in outputs and gradients, for every mask kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse_jax.nn.attention import (
    DECODE_QUERIES,
    MaskSpec,
    attend,
    attention_chunked,
    attention_cudnn,
    attention_xla,
    resolve,
)


def _qkv(b=2, s=40, h=4, g=2, d=16, t=None, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    t = t or s
    return (jax.random.normal(ks[0], (b, s, h, d)), jax.random.normal(ks[1], (b, t, g, d)),
            jax.random.normal(ks[2], (b, t, g, d)))


def _specs(b=2, s=40):
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    seg = jnp.asarray(np.repeat([[1, 2, 3, 4]], b, 0).repeat(s // 4, 1), jnp.int32)
    packed_pos = jnp.asarray(np.tile(np.arange(s // 4), 4)[None].repeat(b, 0), jnp.int32)
    return {
        "causal": MaskSpec(pos, pos, by_index=True),
        "sliding window": MaskSpec(pos, pos, window=7, by_index=True),
        "packed segments": MaskSpec(packed_pos, packed_pos, q_seg=seg, k_seg=seg),
    }


@pytest.mark.parametrize("kind", ["causal", "sliding window", "packed segments"])
@pytest.mark.parametrize("block", [8, 16, 64])
def test_chunked_equals_the_reference_in_outputs_and_gradients(kind, block):
    q, k, v = _qkv()
    spec = _specs()[kind]
    ref = attention_xla(q, k, v, spec)
    got = attention_chunked(q, k, v, spec, block=block)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=2e-5)
    w = jax.random.normal(jax.random.key(9), ref.shape)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, spec) * w)
    g_ref = jax.grad(loss(attention_xla), argnums=(0, 1, 2))(q, k, v)
    g_got = jax.grad(loss(lambda q, k, v, sp: attention_chunked(q, k, v, sp, block=block)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5)


def test_chunked_with_a_kv_cache_equals_the_reference():
    q, k, v = _qkv(s=3, t=37)  # 3 new queries at positions 20..22 over a 37-slot cache holding 23 keys
    qpos = jnp.broadcast_to(jnp.arange(20, 23, dtype=jnp.int32), (2, 3))
    kpos = jnp.broadcast_to(jnp.arange(37, dtype=jnp.int32), (2, 37))
    spec = MaskSpec(qpos, kpos, k_valid=jnp.arange(37) < 23)
    np.testing.assert_allclose(attention_chunked(q, k, v, spec, block=16), attention_xla(q, k, v, spec), atol=2e-5)


def test_chunked_memory_is_linear_in_sequence_length():
    """The compiled temporaries of chunked attention grow ~linearly with s; the reference's quadratically."""
    def temp(fn, s):
        q, k, v = (jax.ShapeDtypeStruct(x.shape, x.dtype) for x in _qkv(b=1, s=s, h=4, g=4, d=32))
        pos = jnp.arange(s, dtype=jnp.int32)[None]
        f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, MaskSpec(pos, pos, by_index=True))), argnums=(0, 1, 2)))
        return f.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    chunked = lambda q, k, v, sp: attention_chunked(q, k, v, sp, block=128)
    grow_chunked = temp(chunked, 2048) / temp(chunked, 512)
    grow_ref = temp(attention_xla, 2048) / temp(attention_xla, 512)
    assert grow_chunked < 4.5 < 8 < grow_ref, (grow_chunked, grow_ref)  # 4x the length: 4x vs ~16x


def test_auto_picks_per_backend_and_falls_back_where_a_kernel_lacks_the_mask():
    s = _specs()
    assert resolve("auto", s["causal"], "cpu") == "xla"
    assert resolve("auto", s["causal"], "gpu") == "cudnn"
    assert resolve("auto", s["packed segments"], "gpu") == "chunked"  # cuDNN path: no segments
    assert resolve("auto", s["sliding window"], "tpu") == "chunked"  # Pallas flash: no window
    assert resolve("auto", s["sliding window"], "gpu") == "cudnn"
    long = _specs(s=256)["causal"]
    assert resolve("auto", long, "tpu") == "flash" and resolve("flash", s["causal"], "tpu") == "chunked"  # 40 % 128


def test_auto_decodes_a_few_queries_against_the_cache_with_all_scores_at_once():
    """Decode (≤ DECODE_QUERIES queries against a KV cache): no fused kernel takes the cache's mask, and the
    key-block scan of ``chunked`` costs more than the whole [b, h, s, t] scores, which are small for few
    queries (v5p, one 7B layer, 576 cached positions: 156 vs 116 MB per step; benchmarks/RESULTS.md)."""
    t = 576
    for s_ in (1, DECODE_QUERIES, DECODE_QUERIES + 1):
        pos = jnp.arange(s_, dtype=jnp.int32)[None]
        spec = MaskSpec(pos, jnp.arange(t, dtype=jnp.int32)[None], k_valid=jnp.arange(t) < 200)
        want = "xla" if s_ <= DECODE_QUERIES else "chunked"
        assert [resolve("auto", spec, p, jnp.bfloat16) for p in ("tpu", "gpu", "cpu")] == [want, want, "xla"]
    assert resolve("chunked", spec, "tpu") == "chunked"  # an explicit choice stands


def test_cudnn_only_for_16_bit_activations():
    """cuDNN's fused attention takes bf16 / fp16 only (float32 failed on the H200: RESULTS)."""
    causal = _specs()["causal"]
    assert resolve("auto", causal, "gpu", jnp.bfloat16) == "cudnn"
    assert resolve("auto", causal, "gpu", jnp.float32) == "chunked"
    with pytest.raises(ValueError, match="attention=cudnn needs bfloat16 or float16 activations, got float32"):
        resolve("cudnn", causal, "gpu", jnp.float32)


def test_the_cudnn_call_means_the_same_attention(monkeypatch):
    """Our cuDNN path (its is_causal / window arguments) describes our mask: the real function runs with
    jax's call swapped to the XLA backend (no GPU here) and equals the reference."""
    real, calls = jax.nn.dot_product_attention, []

    def as_xla(*args, implementation=None, **kw):
        calls.append(implementation)
        return real(*args, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
    q, k, v = _qkv()
    for kind in ("causal", "sliding window"):
        spec = _specs()[kind]
        np.testing.assert_allclose(attention_cudnn(q, k, v, spec), attention_xla(q, k, v, spec), atol=2e-5)
    assert calls == ["cudnn", "cudnn"]


def test_flash_kernel_equals_the_reference_in_tpu_interpret_mode():
    pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
    q, k, v = _qkv(b=1, s=256, h=2, g=1, d=128)
    spec = _specs(b=1, s=256)["causal"]
    with pltpu.force_tpu_interpret_mode():
        got = attend(q, k, v, spec, "flash")
        g_got = jax.grad(lambda q: jnp.sum(attend(q, k, v, spec, "flash") ** 2))(q)
    np.testing.assert_allclose(got, attention_xla(q, k, v, spec), atol=1e-4, rtol=1e-4)
    g_ref = jax.grad(lambda q: jnp.sum(attention_xla(q, k, v, spec) ** 2))(q)
    np.testing.assert_allclose(g_got, g_ref, atol=1e-3, rtol=1e-3)
