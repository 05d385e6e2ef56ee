import os

# Tests run on CPU; keep XLA from grabbing every core's worth of threads on the 2-core CI machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
