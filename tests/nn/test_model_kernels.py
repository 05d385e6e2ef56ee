"""The model through the packed int8 x ternary kernels computes and trains like the fake-quant path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsparse_jax import ConfigError, ModelConfig, SparsityConfig, Transformer, functional
from qsparse_jax.infer.generate import generate
from qsparse_jax.nn.layers import pack_for_inference
from qsparse_jax.nn.model import measure_sparsity, with_config

BITNET = dict(dim=32, n_layers=1, n_heads=2, hidden_dim=64, act_bits=8, weight_bits="1.58", input_norm=True)
SPARSITY = {"qsparse": SparsityConfig.uniform(0.5), "block": SparsityConfig.uniform(0.5, block_size=16)}
TOKENS = jax.random.randint(jax.random.key(0), (2, 6), 0, 256)


def pair(kernels, sparsity):
    ref = Transformer(ModelConfig(**BITNET, sparsity=sparsity), rngs=nnx.Rngs(0))
    return ref, with_config(ref, kernels=kernels)


@pytest.mark.parametrize("sparsity", list(SPARSITY))
@pytest.mark.parametrize("kernels", ["xla", "interpret"])
def test_kernel_forward_equals_the_fake_quant_forward(kernels, sparsity):
    ref, kern = pair(kernels, SPARSITY[sparsity])
    (ra, rp), (ka, kp) = functional(ref), functional(kern)
    np.testing.assert_allclose(jax.jit(ka)(kp, TOKENS), jax.jit(ra)(rp, TOKENS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sparsity", list(SPARSITY))
def test_kernel_gradients_equal_the_fake_quant_gradients(sparsity):
    """STE through top-K and both quantizers (Eq. 13), dW from the sparse quantized input: so training
    through the kernels follows the same trajectory as training on the fake-quant path."""
    ref, kern = pair("xla", SPARSITY[sparsity])
    grads = []
    for model in (ref, kern):
        apply, params = functional(model)
        grads.append(jax.jit(jax.grad(lambda p: jnp.mean(apply(p, TOKENS) ** 2)))(params))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-4)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads[1]))


@pytest.mark.parametrize("bits, scan", [(2, False), (1.6, False), (2, True)], ids=["2bit", "1.6bit", "2bit-scan"])
def test_prepacked_weights_decode_the_same_tokens(bits, scan):
    ref, kern = pair("xla", SPARSITY["qsparse"])
    if scan:  # stacked layers: every layer's weight packed along the layer axis
        from test_model import _scanned_copy

        ref, kern = _scanned_copy(ref), with_config(_scanned_copy(ref), kernels="xla")
    packed = pack_for_inference(kern, bits)
    layer = nnx.state(packed)["layers"] if scan else nnx.state(packed)["layers"][0]
    w = layer["mlp"]["w_down"]["packed"].get_value()
    assert w.data.dtype == jnp.uint8 and w.data.shape[-2:] == (64, -(-32 // (4 if bits == 2 else 5)))
    prompt = np.asarray([[3, 1, 4, 1, 5]], np.int32)
    outs = [generate(*functional(m), m.config, prompt, 5)[0] for m in (ref, packed)]
    np.testing.assert_array_equal(outs[1], outs[0])


def test_measured_sparsity_is_the_same_through_the_kernels():
    ref, kern = pair("xla", SPARSITY["qsparse"])
    assert measure_sparsity(kern, TOKENS) == pytest.approx(measure_sparsity(ref, TOKENS))


def test_kernels_need_a_ternary_int8_model():
    with pytest.raises(ConfigError, match="model.kernels needs a 1.58-bit model with int8 activations"):
        ModelConfig(kernels="on")
    with pytest.raises(ConfigError, match="model.kernels must be one of"):
        ModelConfig(**BITNET, kernels="cuda")
