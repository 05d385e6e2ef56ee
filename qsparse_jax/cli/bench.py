"""``qsparse bench``: benchmarks, each printed as sparse-vs-dense ratios measured in one run.

``qsparse bench topk``: a top-K-sparsified linear layer, forward + backward, against the same dense layer.
``qsparse bench step --config configs/tiny.yaml``: a full train step with the config's sparsity against
the same model dense. ``qsparse bench kernels [--quick]``: the sparse matmul kernels (top-K, int8, packed
ternary weights) against a dense matmul, with bytes/s and the memory-bandwidth roofline.
``qsparse bench eval``: ``qsparse eval`` and ``qsparse lm-eval --model qsparse_jax`` against
lm-eval's HF backend on a tiny local model. ``qsparse bench all --out DIR [--quick]``: on an
accelerator, kernel and sharded-step checks, the kernel table, the train-step ratio and decode
tokens/s in one call, written to DIR/report.md and DIR/report.json.
"""

from __future__ import annotations

import argparse

from ..bench.eval_speed import bench_eval
from ..bench.micro import bench_kernels, bench_step, bench_topk
from ..bench.suite import bench_all
from ..errors import ConfigError
from .common import Parser, command, summary


def _shape(s: str) -> tuple[int, int]:
    try:
        d, n = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be INxOUT like 4096x11008, got {s!r}") from None
    if d < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"shape sizes must be positive, got {s!r}")
    return d, n


def _parser() -> Parser:
    p = Parser(prog="qsparse bench", description=summary(__doc__))
    sub = p.add_subparsers(dest="cmd", required=True)
    tk = sub.add_parser("topk", help="top-K linear layer fwd+bwd vs dense")
    tk.add_argument("--tokens", type=int, default=2048, help="rows of the input (default 2048)")
    tk.add_argument("--d_in", type=int, default=1024, help="input features (default 1024)")
    tk.add_argument("--d_out", type=int, default=4096, help="output features (default 4096)")
    tk.add_argument("--keep", type=float, default=0.7, help="kept fraction (1 - sparsity; default 0.7)")
    tk.add_argument("--block_n", type=int, default=16, help="N of the N:M block variant (default 16)")
    tk.add_argument("--block_m", type=int, default=32, help="M of the N:M block variant (default 32)")
    tk.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    tk.add_argument("--repeats", type=int, default=15, help="timed repeats (default 15)")
    st = sub.add_parser("step", help="train step of a config: with its sparsity vs dense")
    st.add_argument("--config", default="configs/tiny.yaml", help="YAML config (default configs/tiny.yaml)")
    st.add_argument("--repeats", type=int, default=10, help="timed repeats (default 10)")
    st.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    kn = sub.add_parser("kernels", help="sparse matmul kernels (top-K, int8, packed ternary) vs a dense matmul")
    kn.add_argument("--shapes", type=_shape, nargs="+", default=[(4096, 11008), (11008, 4096), (4096, 4096)],
                    help="INxOUT weight shapes (default 4096x11008 11008x4096 4096x4096)")
    kn.add_argument("--batches", type=int, nargs="+", default=[1, 8, 512], help="input rows (default 1 8 512)")
    kn.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.6, 0.4], help="kept fractions (1 - sparsity)")
    kn.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    kn.add_argument("--no_formulations", action="store_true", help="CPU: skip the accumulator formulations")
    kn.add_argument("--quick", action="store_true", help="4096x4096, batches 1 and 8, keep 100%% and 40%%, 3 repeats")
    ev = sub.add_parser("eval", help="qsparse eval and qsparse lm-eval vs lm-eval's HF backend on a tiny local model")
    ev.add_argument("--items", type=int, default=60, help="four-choice items (4 requests each; default 60)")
    ev.add_argument("--batch_size", type=int, default=32, help="rows per batch (default 32)")
    ev.add_argument("--repeats", type=int, default=2, help="interleaved runs of each; the best is kept")
    ev.add_argument("--out", default=None, help="work directory (default: a fresh temporary one)")
    a = sub.add_parser("all", help="checks, kernel table, train-step ratio, decode tokens/s: markdown + JSON report")
    a.add_argument("--out", required=True, help="directory for report.md and report.json")
    a.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test (CPU CI), not a measurement")
    a.add_argument("--budget_s", type=float, default=330.0,
                   help="skip sections that would start after this many seconds (default 330, so that one "
                        "accelerator call stays under 8 minutes)")
    a.add_argument("--layers", type=int, default=None, help="layers of the cut 7B model (default 4; quick: 1)")
    a.add_argument("--sections", default="checks,kernels,step,decode",
                   help="comma-separated subset of checks,kernels,step,decode")
    return p


@command()
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "all":
        return bench_all(args)
    if args.cmd == "eval":
        if min(args.items, args.batch_size, args.repeats) < 1:
            raise ConfigError("--items, --batch_size and --repeats must be positive")
        return bench_eval(args)
    if args.cmd == "kernels":
        if args.quick:
            args.shapes, args.batches, args.keeps, args.repeats = [(4096, 4096)], [1, 8], [1.0, 0.4], 3
        if min(args.batches) < 1 or args.repeats < 1 or not all(0.0 < f <= 1.0 for f in args.keeps):
            raise ConfigError("--batches and --repeats must be positive and --keeps in (0, 1]")
        return bench_kernels(args)
    if args.cmd == "step":
        return bench_step(args)
    if not 0.0 < args.keep <= 1.0:
        raise ConfigError(f"--keep must be in (0, 1], got {args.keep}")
    if min(args.tokens, args.d_in, args.d_out, args.repeats) < 1:
        raise ConfigError("--tokens, --d_in, --d_out and --repeats must be positive")
    if args.d_in % args.block_m or not 1 <= args.block_n <= args.block_m:
        raise ConfigError(f"--block_m must divide --d_in and 1 <= --block_n <= --block_m, got "
                          f"{args.block_n}:{args.block_m} with d_in={args.d_in}")
    return bench_topk(args)
