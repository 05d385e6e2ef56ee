"""qsparse compile (train.py --compile_only): the real train step compiled ahead of time for simulated CPU devices or a TPU slice."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx

from qsparse_jax.config import load_config
from qsparse_jax.nn.model import Transformer
from qsparse_jax.train.topology import known_topologies, slice_topology

ROOT = Path(__file__).resolve().parents[2]
QSPARSE = str(Path(sys.executable).with_name("qsparse"))  # the console script, as a user runs it


def _has_libtpu() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


needs_libtpu = pytest.mark.skipif(not _has_libtpu(), reason="libtpu is not installed (pip install -e '.[tpu]')")


def _compile_only(tmp_path, *args):
    out = tmp_path / "report.json"
    p = subprocess.run([QSPARSE, "compile", "--report_json", str(out), *map(str, args)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    return p, (json.loads(out.read_text()) if out.exists() else None)


def test_eight_simulated_cpu_devices_report_exact_parameter_bytes_per_device(tmp_path):
    p, r = _compile_only(tmp_path, "--config", "configs/tiny.yaml", "--cpu_devices", 8, "mesh.data=1", "mesh.fsdp=-1")
    assert p.returncode == 0, p.stderr
    assert "8 local cpu device(s)" in p.stdout and "mesh data=1 fsdp=8 tensor=1" in p.stdout
    cfg = load_config(str(ROOT / "configs/tiny.yaml"))
    params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))[1]
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    # every tiny-config dimension divides by 8: each device holds exactly 1/8 (float32); AdamW 2 moments
    assert r["params_bytes_per_device"] == n * 4 // 8
    assert r["opt_state_bytes_per_device"] >= 2 * n * 4 // 8
    assert r["fits"] is None and r["temp_bytes"] > 0 and r["flops_per_device_compiler"] > 0


def test_unknown_topology_exits_2_listing_the_known_ones(tmp_path):
    p, _ = _compile_only(tmp_path, "--config", "configs/tiny.yaml", "--topology", "v9-8")
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "unknown topology 'v9-8'; known: v4-8" in p.stderr and "v5p-128" in p.stderr


def test_slice_names_map_to_physical_topologies():
    assert slice_topology("v5p-128") == ("v5p", "4x4x4")  # 128 TensorCores = 64 chips
    assert slice_topology("v5e-256") == ("v5e", "16x16") and slice_topology("v6e-64") == ("v6e", "8x8")
    assert slice_topology("v5p:2x2x1") == ("v5p", "2x2x1")
    assert {"v5p-128", "v5e-256", "v6e-64", "v4-32"} <= set(known_topologies())


@needs_libtpu
def test_tiny_config_compiles_for_a_tpu_slice_and_fits(tmp_path):
    p, r = _compile_only(tmp_path, "--config", "configs/tiny.yaml", "--topology", "v5e-4")
    assert p.returncode == 0, p.stderr
    assert r["devices"] == 4 and r["chip"] == "TPU v5e" and r["fits"] is True
    assert r["flops_per_device_compiler"] > 0 and (r["mfu_bound"] is None or 0 < r["mfu_bound"] < 1)
    assert "WARNING" not in p.stderr  # libtpu's start-up chatter is silenced off a TPU VM


@needs_libtpu
def test_a_config_too_large_for_the_chip_exits_1_with_the_shortfall(tmp_path):
    big = ["model.dim=8192", "model.hidden_dim=32768", "model.n_layers=2", "model.n_heads=64", "data.batch_size=1",
           "data.seq_len=128"]  # 2.2 B parameters + AdamW moments in float32 on one 16 GiB chip
    p, r = _compile_only(tmp_path, "--config", "configs/tiny.yaml", "--topology", "v5e-1", *big)
    assert p.returncode == 1 and r["fits"] is False
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: does not fit:") and "GiB per device needed" in err[0]


@needs_libtpu
# dense, block and bitnet compile the same graph differently sparsified or quantized (README table, all four
# measured); CI compiles the Q-Sparse one
@pytest.mark.parametrize("config", ["7b-qsparse"])
def test_7b_configs_fit_a_v5p_128_at_their_own_batch_size(config):
    from qsparse_jax.train.aot import report

    cfg = load_config(str(ROOT / f"configs/{config}.yaml"))
    r = report(cfg, "v5p-128", costs=False)
    assert r["devices"] == 64 and r["batch_size"] == cfg.data.batch_size == 256
    assert r["fits"] is True and r["margin"] >= 0.10, r


def test_generate_compile_only_reports_the_decode_loop(tmp_path):
    p = subprocess.run([QSPARSE, "generate", "--config", "configs/tiny.yaml", "--compile_only",
                        "--batch", "2", "--prompt_len", "16", "--max_new_tokens", "8"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "batch 2, prompt 16 + 8 new tokens" in p.stdout and "decode loop" in p.stdout
    same = subprocess.run([QSPARSE, "compile", "--decode", "--config", "configs/tiny.yaml", "--batch", "2",
                           "--prompt_len", "16", "--max_new_tokens", "8"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert same.returncode == 0, same.stderr
    drop_time = lambda out: [line for line in out.splitlines() if "compile time" not in line]
    assert drop_time(same.stdout) == drop_time(p.stdout)
    bad = subprocess.run([QSPARSE, "generate", "--hf", str(tmp_path), "--compile_only"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: --compile_only needs --config (the model to compile; no weights are read)")
