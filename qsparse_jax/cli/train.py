"""``qsparse train``: train a Q-Sparse / BitNet transformer from a YAML config and ``key=value`` overrides.

``qsparse train --config configs/tiny.yaml --workdir DIR [--init_from CKPT] [--distributed] [key=value ...]``
(``python train.py`` at the repository root is the same command). The run directory gets metrics,
TensorBoard logs and checkpoints; an interrupted run resumes from its last checkpoint when started
again with the same ``--workdir`` (from its newest intact checkpoint; a different model config is refused
before anything is read, and a changed ``train.steps`` recomputes the learning-rate schedule, said in one
line). ``--cpu_devices N`` trains on N simulated CPU devices. ``--compile_only`` compiles the train step
instead and reports memory and FLOPs (the same as ``qsparse compile``).
"""

from __future__ import annotations

from ..config import load_config
from ..errors import ConfigError
from ..train.aot import compile_train
from ..train.loop import train
from ..train.topology import simulate_cpu_devices
from .common import Parser, command, fail, summary


def _init_distributed():
    import os

    import jax

    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()


def add_compile_options(p: Parser, *, flag: str = "", cpu_devices: str | None = None) -> None:
    """``--topology`` / ``--cpu_devices`` / ``--report_json`` (shared with ``qsparse compile``);
    ``cpu_devices``: the help of ``--cpu_devices`` where it does more than compile."""
    w = f"with {flag}: " if flag else ""
    p.add_argument("--topology", help=f"{w}a TPU slice to compile for, e.g. v5p-128, v5e-256, v6e-64 (needs libtpu)")
    p.add_argument("--cpu_devices", type=int, help=cpu_devices or f"{w}N simulated CPU devices (instead of --topology)")
    p.add_argument("--report_json", help=f"{w}also write the report here as JSON")


def check_compile_options(args) -> None:
    if args.cpu_devices is not None:
        if args.topology:
            raise ConfigError("--cpu_devices and --topology exclude each other")
        simulate_cpu_devices(args.cpu_devices)  # before JAX starts its backends


@command()
def main(argv=None, prog: str = "qsparse train") -> int:
    p = Parser(prog=prog, description=summary(__doc__))
    p.add_argument("--config", help="YAML config (configs/*.yaml); the defaults when omitted")
    p.add_argument("--workdir", help="run directory: metrics, tensorboard, checkpoints (required unless --compile_only)")
    p.add_argument("--init_from", help="start from this checkpoint's parameters (continued training)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() (TPU pods and SLURM/GPU clusters detect "
                        "their peers; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    p.add_argument("--compile_only", action="store_true",
                   help="compile the train step ahead of time and report memory / FLOPs / fit; train nothing "
                        "(the same as qsparse compile)")
    add_compile_options(p, flag="--compile_only",
                        cpu_devices="N simulated CPU devices: train on them (a sharded run without accelerators), "
                                    "or with --compile_only compile for them (instead of --topology)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-3")
    args = p.parse_intermixed_args(argv)  # overrides may come before, between or after the flags
    if not args.compile_only and (args.topology or args.report_json):
        return fail("--topology and --report_json go with --compile_only")
    if not args.compile_only and not args.workdir:
        return fail("--workdir is required (the run directory), unless --compile_only")
    if args.compile_only or args.cpu_devices is not None:
        check_compile_options(args)
    if args.distributed:
        _init_distributed()
    cfg = load_config(args.config, args.overrides)
    if args.compile_only:
        return compile_train(cfg, args.topology, args.config or "(defaults)", args.report_json)
    metrics = train(cfg, args.workdir, init_from=args.init_from)
    if metrics.get("val_loss") is not None:
        print(f"done: final validation loss {metrics['val_loss']:.4f}")
    return 0
