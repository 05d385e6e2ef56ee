"""KV-cache decoding: the cache reproduces the full forward pass, greedy decoding matches recomputation."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsparse_jax import ModelConfig, SparsityConfig, Transformer, functional
from qsparse_jax.infer.generate import generate
from qsparse_jax.nn.decode import init_cache

CASES = {
    "dense": dict(),
    "gqa+window": dict(n_kv_heads=1, sliding_window=3),
    "qsparse+int8+ternary": dict(sparsity=SparsityConfig.uniform(0.5), act_bits=8, weight_bits="1.58"),
    "block-qsparse": dict(sparsity=SparsityConfig.uniform(0.5, block_size=16)),
}


def tiny(**kw):
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, **kw)
    return cfg, *functional(Transformer(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_then_cached_steps_equal_the_full_forward(case):
    cfg, apply, params = tiny(**CASES[case])
    t = jax.random.randint(jax.random.key(1), (2, 10), 0, 256)
    apply = jax.jit(apply)  # eager top-K bisection dispatches op by op: slow
    full = np.asarray(apply(params, t))
    logits, cache = apply(params, t[:, :6], cache=init_cache(cfg, 2, 16))
    steps = [np.asarray(logits)]
    for i in range(6, 10):
        logits, cache = apply(params, t[:, i:i + 1], cache=cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)
    assert int(cache[0]["index"]) == 10


def test_greedy_generation_equals_argmax_recomputed_from_scratch():
    cfg, apply, params = tiny(sparsity=SparsityConfig.uniform(0.4))
    prompt = np.asarray([[5, 17, 99, 3]], np.int32)
    out, timing = generate(apply, params, cfg, prompt, 6)
    seq = np.concatenate([prompt, out], axis=1)
    # teacher-forced on its own output, the full model's argmax at every step is the generated token
    greedy = np.asarray(jnp.argmax(jax.jit(apply)(params, jnp.asarray(seq)), -1))
    np.testing.assert_array_equal(greedy[:, 3:-1], out)
    assert timing["tokens_per_s"] > 0 and timing["prefill_s"] > 0


def test_generate_cli_prints_dense_vs_sparse_speed(tmp_path):
    root = Path(__file__).resolve().parents[2]
    qsparse = str(Path(sys.executable).with_name("qsparse"))  # the console script, as a user runs it
    args = [qsparse, "generate", "--config", "configs/tiny.yaml", "model.dim=64",
            "model.n_layers=2", "model.hidden_dim=128", "--max_new_tokens", "8", "--repeats", "1", "--batch", "2"]
    out = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sparse / dense decode speed:" in out.stdout and "decode tok/s" in out.stdout
    bad = subprocess.run(args[:5] + ["--max_new_tokens", "5000"], cwd=root, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "exceed model.max_seq_len" in bad.stderr
