"""qsparse-jax: sparsely-activated (Q-Sparse) and 1.58-bit LLMs in JAX / Flax NNX."""

from .config import ConfigError, ModelConfig, SparsityConfig
from .model import Transformer, activated_params, cross_entropy, functional, measure_sparsity
from .quant import quantize_activations, quantize_weights
from .sparsity import keep_count, topk_mask, topk_sparsify

__version__ = "0.1.0"
__all__ = ["ConfigError", "ModelConfig", "SparsityConfig", "Transformer", "activated_params", "cross_entropy",
           "functional", "measure_sparsity", "quantize_activations", "quantize_weights", "keep_count", "topk_mask",
           "topk_sparsify"]
