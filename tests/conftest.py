import os

# Tests run on CPU; keep XLA from grabbing every core's worth of threads on the 2-core CI machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("ci")


def pytest_configure(config):
    config.addinivalue_line("markers", "libtpu: compiles for TPU through libtpu (the tpu extra, in dev); skipped where "
                                       "libtpu is not installed; deselect with -m 'not libtpu'")
