"""``qsparse compile``: compile the train step (or, with ``--decode``, decoding) ahead of time and report memory.

``qsparse compile --config C [--topology T | --cpu_devices N] [--report_json F] [key=value ...]``
compiles the real train step for a TPU slice (through libtpu's topology description, on any machine)
or for N simulated CPU devices, and reports memory per device against the chip's HBM, FLOPs and the
compiler's step time; nothing is allocated or trained. Exit status 1 when it does not fit.

``qsparse compile --decode --config C [--batch B --prompt_len P --max_new_tokens N] [--sparsity S]
[--kernels on --bits 2|1.6]`` compiles prefill + KV-cache decoding instead (randomly shaped weights,
none read) and reports memory, what was compiled (the kernel path is the target's: Pallas TPU kernels
for a TPU slice), and the compiler's per-token step time and bytes beside the byte roofline (bytes the
step must read ÷ the chip's HBM bandwidth). An option that cannot apply to what is compiled (``--bits``
with kernels off, ``--kernels`` or sparsity on an LTE model, ``--kernels pallas`` for CPU devices) is an
error, never dropped.
"""

from __future__ import annotations

import json

from ..config import KERNELS, load_config
from ..infer.generate import compile_decode
from ..train.aot import compile_train, format_decode_report
from .common import (
    Parser,
    add_sparsity_options,
    command,
    fail,
    sparsity_options,
    summary,
)
from .train import add_compile_options, check_compile_options

DECODE_OPTIONS = ("batch", "prompt_len", "max_new_tokens", "kernels", "bits", "sparsity", "block_size",
                  "qkv_sparsity", "out_sparsity", "gate_up_sparsity", "down_sparsity")


def add_decode_options(p: Parser, *, flag: str = "--decode") -> None:
    """The decode shape options (shared with ``qsparse generate --compile_only``)."""
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--prompt_len", type=int, default=128, help=f"with {flag}: prompt length in tokens (default 128)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens generated after the prompt (default 64)")
    p.add_argument("--kernels", default=None, choices=KERNELS,
                   help="1.58-bit models: the packed int8 x ternary kernels (default: the config's model.kernels)")
    p.add_argument("--bits", type=float, default=None, choices=[2, 1.6],
                   help="packed weight format with kernels on (default 2)")


def run_decode(args, config_name: str) -> int:
    """Compile and print the decode report (``--decode`` here, ``generate --compile_only``)."""
    cfg = load_config(args.config, args.overrides)
    r = compile_decode(cfg, topology=args.topology, batch=args.batch, prompt_len=args.prompt_len,
                       max_new_tokens=args.max_new_tokens, kernels=args.kernels, bits=args.bits,
                       **sparsity_options(args))
    print(format_decode_report(r, config_name), flush=True)
    if getattr(args, "report_json", None):
        with open(args.report_json, "w") as f:
            json.dump(r, f, indent=1)
    return 1 if r["fits"] is False else 0


@command()
def main(argv=None) -> int:
    p = Parser(prog="qsparse compile", description=summary(__doc__))
    p.add_argument("--config", help="YAML config (configs/*.yaml); the defaults when omitted")
    add_compile_options(p)
    p.add_argument("--decode", action="store_true", help="compile prefill + KV-cache decoding instead of the train step")
    add_decode_options(p)
    add_sparsity_options(p, run="decoding (with --decode)")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides, e.g. mesh.fsdp=-1")
    args = p.parse_intermixed_args(argv)  # key=value overrides may come between the flags
    decode_only = [f"--{k}" for k in DECODE_OPTIONS if getattr(args, k) != p.get_default(k)]
    if not args.decode and decode_only:
        return fail(f"{', '.join(decode_only)} go with --decode (the train step compiles the config as it is)")
    check_compile_options(args)
    name = args.config or "(defaults)"
    if args.decode:
        return run_decode(args, name)
    return compile_train(load_config(args.config, args.overrides), args.topology, name, args.report_json)
