"""``python -m qsparse_jax COMMAND ...``: the ``qsparse`` command line (``qsparse_jax.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
