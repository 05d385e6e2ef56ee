import atexit
import os
import shutil
import tempfile

# Tests run on CPU; keep XLA from grabbing every core's worth of threads on the 2-core CI machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for this test session, fresh each session and removed after it: many
# tests compile the same programs again (the same tiny config trained by several tests, in this process, in
# pytest-xdist workers and in the CLI subprocesses they start, which inherit these variables). Measured on
# 2 cores, tests/train/test_train.py's training tests: 168 s without, 70 s with. Set by the first process
# (the xdist controller), so every worker shares it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="qsparse-jax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["QSPARSE_TEST_XLA_CACHE_OWNER"] = str(os.getpid())
    atexit.register(lambda: os.getpid() == int(os.environ.get("QSPARSE_TEST_XLA_CACHE_OWNER", -1))
                    and shutil.rmtree(_cache, ignore_errors=True))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Tests check values, not the speed of the compiled code, and most of their time is XLA compiling on CPU: so the
# cheapest compile (jax_disable_most_optimizations: backend optimization level 0, no expensive LLVM passes).
# tests/train/test_methods.py on one core: 315 s with full optimization, 196 s without; the whole suite on
# 2 cores: 719 passed either way. It reaches TPU compiles too, where it changed nothing measured: tiny.yaml on
# a v5p-8 gives the same peak bytes and step estimate with and without it; test_aot's 7B fit takes as long.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# and XLA:CPU's older loop emitters instead of its fusion emitters: a small model's train step compiles ~30 %
# faster (an 8-step tiny training run, cold: 10.6-12.6 s -> 8.1 s). Subprocesses inherit it (the tests build
# their environments with qsparse_jax.testing.fixtures.cpu_env, which keeps these flags).
if "--xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false").strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# 15 examples per property (derandomized: the same shapes every run) keep the 2-core CI under its time target
settings.register_profile("ci", deadline=None, max_examples=15, derandomize=True)
settings.load_profile("ci")


def pytest_configure(config):
    config.addinivalue_line("markers", "libtpu: compiles for TPU through libtpu (the tpu extra, in dev); skipped where "
                                       "libtpu is not installed; deselect with -m 'not libtpu'")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small corpus of Python-like word salad: 24 documents of 400 words (training tests)."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y", "(", ")", ":"]
    for i in range(24):
        (d / f"doc{i:02d}.py").write_text(" ".join(rng.choice(words, 400)) + "\n")
    return str(d)
