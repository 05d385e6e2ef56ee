"""Command-line entry points. User mistakes exit with status 2 and one line, never a traceback."""

from __future__ import annotations

import argparse
import sys


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _init_distributed():
    import os

    import jax

    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()


def train_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="train.py", description="Train a Q-Sparse / BitNet transformer.")
    p.add_argument("--config", help="YAML config (configs/*.yaml); defaults when omitted")
    p.add_argument("--workdir", required=True, help="run directory: metrics, tensorboard, checkpoints")
    p.add_argument("--init_from", help="start from this checkpoint's parameters (continued training)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() (TPU pods and SLURM/GPU clusters detect "
                        "their peers; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-3")
    args = p.parse_args(argv)

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's INFO/WARNING chatter is not for users
    from .config import ConfigError, load_config
    from .trainer import TrainingError, train

    if args.distributed:
        _init_distributed()

    try:
        cfg = load_config(args.config, args.overrides)
        metrics = train(cfg, args.workdir, init_from=args.init_from)
    except (ConfigError, TrainingError) as e:  # DataError is a ConfigError
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted")
    if metrics.get("val_loss") is not None:
        print(f"done: final validation loss {metrics['val_loss']:.4f}")
    return 0
