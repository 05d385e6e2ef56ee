"""qsparse-jax: sparsely-activated (Q-Sparse) and 1.58-bit LLMs in JAX / Flax NNX.

Names are imported on first use, so command-line tools that never touch a device (``prepare``)
do not pay for importing JAX.
"""

import importlib

from . import _quiet_tpu

_quiet_tpu.apply()  # libtpu installed, no TPU chip: JAX skips the TPU runtime (and its page of warnings)

__version__ = "0.1.0"
_EXPORTS = {"ConfigError": "errors", "ModelConfig": "config", "SparsityConfig": "config", "Transformer": "nn.model",
            "activated_params": "nn.model", "cross_entropy": "nn.model", "functional": "nn.model",
            "measure_sparsity": "nn.model", "quantize_activations": "ops.quant", "quantize_weights": "ops.quant",
            "keep_count": "ops.topk", "topk_mask": "ops.topk", "topk_sparsify": "ops.topk"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        # imported on first use: `import qsparse_jax` (and `qsparse prepare`, `qsparse --help`) stays free of JAX
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'qsparse_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
