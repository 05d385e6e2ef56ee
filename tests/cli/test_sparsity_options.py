"""One way from command-line sparsity options to a ``SparsityConfig``: a Block Q-Sparse model keeps its blocks."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from qsparse_jax.checkpoints.native import write_model_checkpoint
from qsparse_jax.checkpoints.source import load
from qsparse_jax.config import Config, DataConfig, ModelConfig, SparsityConfig
from qsparse_jax.infer.generate import decode_runs
from qsparse_jax.infer.variants import sparsity_config
from qsparse_jax.nn.model import Transformer
from qsparse_jax.ops.topk import GRADS, RESCALES

ROOT = Path(__file__).resolve().parents[2]
QSPARSE = str(Path(sys.executable).with_name("qsparse"))


@pytest.fixture(scope="module")
def block_ckpt(tmp_path_factory):
    """A tiny Block Q-Sparse checkpoint (S = 0.5 in blocks of 8, rescale and gradient not the defaults')."""
    sp = SparsityConfig.uniform(0.5, block_size=8, rescale=RESCALES[-1], grad=GRADS[-1])
    assert (sp.rescale, sp.grad) != (SparsityConfig().rescale, SparsityConfig().grad)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_seq_len=64, sparsity=sp)
    work = tmp_path_factory.mktemp("block")
    write_model_checkpoint(Transformer(cfg, rngs=nnx.Rngs(0)), Config(model=cfg, data=DataConfig.for_model(cfg)), work)
    return work / "checkpoints"


def test_sparsity_config_keeps_what_is_not_given():
    own = SparsityConfig.uniform(0.5, block_size=8, rescale=RESCALES[-1], grad=GRADS[-1])
    s = sparsity_config(0.7, default=own)
    assert (s.qkv, s.out, s.gate_up, s.down, s.block_size, s.rescale, s.grad) == \
           (0.7, 0.7, 0.7, 0.7, 8, own.rescale, own.grad)
    s = sparsity_config(0.7, default=own, block_size=16, down=0.2)
    assert (s.qkv, s.down, s.block_size) == (0.7, 0.2, 16)


def test_generate_sparsity_on_a_block_checkpoint_keeps_its_blocks(block_ckpt):
    ld = load(ckpt=str(block_ckpt))
    assert ld.model.config.sparsity.block_size == 8
    prompt = np.tile(ld.tokenizer.encode("def f(x):").astype(np.int32)[None], (2, 1))
    runs = decode_runs(ld.model, prompt, 4, sparsity=0.75)
    sp, own = runs["sparse"].sparsity, ld.model.config.sparsity
    assert sp.block_size == 8 and (sp.rescale, sp.grad) == (own.rescale, own.grad)
    assert (sp.qkv, sp.out, sp.gate_up, sp.down) == (0.75,) * 4
    assert not runs["dense"].sparsity.enabled and runs["sparse"].tokens.shape == (2, 4)


def test_generate_command_on_a_block_checkpoint(block_ckpt):
    p = subprocess.run([QSPARSE, "generate", "--ckpt", str(block_ckpt), "--sparsity", "0.75", "--max-new-tokens", "4",
                        "--repeats", "1", "--prompt", "def f(x):"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "sparse / dense decode speed:" in p.stdout
