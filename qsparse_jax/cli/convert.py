"""TODO docstring (convert)."""

from __future__ import annotations

import argparse
import sys

from ..checkpoints.hf import export_hf, import_hf
from ..errors import ConfigError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsparse_jax.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import-hf", help="HF directory -> orbax checkpoint + config.yaml")
    imp.add_argument("src")
    imp.add_argument("workdir")
    imp.add_argument("--scan-layers", action="store_true",
                     help="stack the layers for model.scan_layers (compile time independent of depth)")
    exp = sub.add_parser("export-hf", help="orbax checkpoint -> HF directory")
    exp.add_argument("ckpt")
    exp.add_argument("dst")
    exp.add_argument("--model-type", choices=["llama", "mistral", "qwen2", "bitnet"], default=None)
    exp.add_argument("--ternary", action="store_true",
                     help="1.58-bit models: write 2-bit packed ternary weights + scales (transformers' bitnet)")
    args = p.parse_args(argv)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        if args.cmd == "import-hf":
            out = import_hf(args.src, args.workdir, args.scan_layers)
        else:
            out = export_hf(args.ckpt, args.dst, args.model_type, args.ternary)
    except ConfigError as e:  # HFError and CheckpointError are ConfigErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0

