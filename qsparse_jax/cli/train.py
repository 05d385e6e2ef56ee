"""TODO docstring (cli)."""

from __future__ import annotations

import argparse
import sys

from ..config import load_config
from ..errors import ConfigError
from ..train.aot import main as compile_main
from ..train.loop import TrainingError, train


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
    p.add_argument("--workdir", help="run directory: metrics, tensorboard, checkpoints (required unless --compile_only)")
    p.add_argument("--init_from", help="start from this checkpoint's parameters (continued training)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() (TPU pods and SLURM/GPU clusters detect "
                        "their peers; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    p.add_argument("--compile_only", action="store_true",
                   help="compile the train step ahead of time and report memory / FLOPs / fit; train nothing")
    p.add_argument("--topology", help="with --compile_only: a TPU slice to compile for, e.g. v5p-128, v5e-256, v6e-64")
    p.add_argument("--cpu_devices", type=int, help="with --compile_only: N simulated CPU devices (no --topology)")
    p.add_argument("--report_json", help="with --compile_only: also write the report here as JSON")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-3")
    args = p.parse_args(argv)
    if not args.compile_only and (args.topology or args.cpu_devices or args.report_json):
        return _fail("--topology, --cpu_devices and --report_json go with --compile_only")
    if not args.compile_only and not args.workdir:
        return _fail("--workdir is required (the run directory), unless --compile_only")
    if args.cpu_devices is not None:
        if args.topology or args.cpu_devices < 1:
            return _fail("--cpu_devices takes a positive count and no --topology")
        import os

        os.environ["JAX_PLATFORMS"] = "cpu"  # must be set before JAX starts: simulate the devices on the host
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's INFO/WARNING chatter is not for users

    if args.distributed:
        _init_distributed()

    try:
        cfg = load_config(args.config, args.overrides)
        if args.compile_only:

            return compile_main(cfg, args.topology, args.config or "(defaults)", args.report_json)
        metrics = train(cfg, args.workdir, init_from=args.init_from)
    except (ConfigError, TrainingError) as e:  # DataError is a ConfigError
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted")
    if metrics.get("val_loss") is not None:
        print(f"done: final validation loss {metrics['val_loss']:.4f}")
    return 0

