"""TODO docstring (lm_eval_backend)."""

from __future__ import annotations

import sys

from ..errors import ConfigError

try:
    import lm_eval.models  # noqa: F401  lm-eval registers its own models only into an empty registry: first
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # the base install: the console script still says what to install, in one line
    _MISSING = 'the lm-eval backend needs lm-evaluation-harness: pip install -e ".[eval]"'
    TemplateLM, register_model = object, (lambda *names: (lambda cls: cls))
else:
    _MISSING = None


def main(argv: list[str] | None = None) -> int:
    """lm-eval's CLI with this backend registered; our configuration errors are one line, exit 2."""
    if _MISSING:
        print(f"error: {_MISSING}", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        cli_evaluate()
    except ConfigError as e:  # DataError, HFError, CheckpointError are ConfigErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

