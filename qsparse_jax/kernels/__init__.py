"""Inference kernels for Q-Sparse with BitNet b1.58 weights: packed ternary weights, int8 activations.

``pack_ternary(weight[in, out], bits=2|1.6)`` → ``PackedTernary``;
``qsparse_matmul(x, packed, k=..., block_size=None, impl="auto")`` → ``y [..., out]``.
"""

from .api import DECODE_MAX_TOKENS, IMPLS, qsparse_matmul
from .packing import (
           BITS,
           TPU_ALIGN,
           PackedTernary,
           dequantize,
           pack_levels,
           pack_ternary,
           unpack_levels,
)

__all__ = ["BITS", "DECODE_MAX_TOKENS", "TPU_ALIGN", "IMPLS", "PackedTernary", "dequantize", "pack_levels", "pack_ternary",
           "qsparse_matmul", "unpack_levels"]
