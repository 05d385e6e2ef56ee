"""One forward pass of an untrained model on real bytes: its loss and the sparsity measured at every projection input.

What ``qsparse demo`` prints (Q-Sparse Table 2's measurement on a model small enough for any CPU): the
text is the first bytes of the standard library's ``json/decoder.py``, present on every Python, so
the demo needs no data and no download.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import ModelConfig
from ..errors import ConfigError
from ..nn.model import Transformer, cross_entropy, functional, measure_sparsity


def stdlib_bytes(n: int) -> np.ndarray:
    """The first n bytes of the standard library's ``json/decoder.py`` (present on every Python)."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py"
    return np.frombuffer(path.read_bytes()[:n], np.uint8)


def forward_stats(cfg: ModelConfig, batch: int = 4, seq_len: int = 256, seed: int = 0) -> dict:
    """A randomly initialized ``Transformer(cfg)`` on ``batch`` rows of ``seq_len`` + 1 bytes:
    ``{"logits_shape", "loss" (nats per byte), "sparsity" (measure_sparsity's dict)}``."""
    if seq_len < 2 or batch < 1:
        raise ConfigError(f"--seq_len must be >= 2 and --batch >= 1, got {seq_len} and {batch}")
    data = stdlib_bytes(batch * (seq_len + 1)).astype(np.int32)
    if data.size < batch * (seq_len + 1):
        raise ConfigError(f"the demo text has {data.size} bytes, fewer than --batch x (--seq_len + 1)")
    tokens = jnp.asarray(data.reshape(batch, seq_len + 1))
    apply, params = functional(Transformer(cfg, rngs=nnx.Rngs(seed)))
    logits = jax.jit(apply)(params, tokens[:, :-1])
    return {"logits_shape": tuple(logits.shape), "loss": float(cross_entropy(logits, tokens[:, 1:])),
            "sparsity": measure_sparsity(apply, params, tokens[:, :-1])}
