#!/usr/bin/env python
"""Train a Q-Sparse / BitNet transformer: ``python train.py --config configs/tiny.yaml --workdir DIR [key=value ...]``
(the same command and flags as ``qsparse train``)."""

import sys

from qsparse_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main(prog="train.py"))
