#!/usr/bin/env python
"""Train a Q-Sparse / BitNet transformer: ``python train.py --config configs/tiny.yaml --workdir DIR [key=value ...]``."""

import sys

from qsparse_jax.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
