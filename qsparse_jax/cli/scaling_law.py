"""``qsparse scaling-law``: fit, solve and plot Q-Sparse's sparsity scaling law L(N, S).

``qsparse scaling-law fit --csv runs.csv [--n_col N --s_col S --loss_col loss] [--bootstrap 200]``
fits L(N, S) = E + (B + C exp(beta / (1 - S))) / N^alpha to the final losses of a CSV of runs (N total
parameters, S sparsity), with bootstrap intervals, and prints the inference-optimal sparsity S*.
``qsparse scaling-law optimum [--preset paper|fp|bitnet158] [--E 1.86 --B 0.01 --C 1.89 --alpha 0.10
--beta 0.05]`` prints S* for given constants (default: the paper's printed full-precision ones; ``fp`` and
``bitnet158`` set β to reproduce the reported 45.58 % and 61.25 %, as the paper prints no other constants). ``qsparse scaling-law plot --out law.png [--csv runs.csv]
[--sparsities 0 0.4 0.7] [constants]`` draws loss against activated parameters for several S.
"""

from __future__ import annotations

from ..analysis.scaling_law import (
    NAMES,
    PAPER,
    PRESETS,
    LawParams,
    fit_report,
    optimum_report,
    plot_runs,
)
from .common import Parser, command, summary


def _add_constants(p, paper_default: bool):
    for n in NAMES:
        p.add_argument(f"--{n}", type=float, default=None,
                       help=f"constant {n} (default: the preset's, else "
                            f"{'the paper' if paper_default else 'the fit, else the paper'}'s "
                            f"{getattr(PAPER, n)})")


def _add_preset(p):
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="constants to start from (given constants override them): paper = as printed, full "
                        "precision (S* 50.2 %%); fp = paper with beta 0.0547, the reported full-precision S* "
                        "45.58 %%; bitnet158 = paper with beta 0.03894, the reported BitNet b1.58 S* 61.25 %% "
                        "(the paper prints no 1.58-bit constants: derived, not published)")


def _constants(args) -> LawParams | None:
    """The given constants on top of the preset's (the paper's printed ones without a preset); None when
    neither a preset nor a constant was given."""
    given = {n: getattr(args, n) for n in NAMES if getattr(args, n) is not None}
    preset = getattr(args, "preset", None)
    base = PRESETS[preset or "paper"]
    return LawParams(**{n: given.get(n, getattr(base, n)) for n in NAMES}) if given or preset else None


def _add_columns(p):
    p.add_argument("--n_col", default="N", help="total-parameter column (default N)")
    p.add_argument("--s_col", default="S", help="sparsity column (default S)")
    p.add_argument("--loss_col", default="loss", help="final-loss column (default loss)")


@command()
def main(argv=None) -> int:
    p = Parser(prog="qsparse scaling-law", description=summary(__doc__))
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{fit,optimum,plot}")
    f = sub.add_parser("fit", help="fit the law to a CSV of runs, with bootstrap intervals")
    f.add_argument("--csv", required=True, help="runs: one row per run, with total parameters, sparsity, final loss")
    _add_columns(f)
    f.add_argument("--bootstrap", type=int, default=200,
                   help="resamples for the intervals (0: none; default 200), their progress on stderr")
    f.add_argument("--level", type=float, default=95.0, help="interval level in %% (default 95)")
    f.add_argument("--seed", type=int, default=0, help="seed of the resampling (default 0)")
    o = sub.add_parser("optimum", help="inference-optimal sparsity S* for given constants")
    _add_preset(o)
    _add_constants(o, paper_default=True)
    o.add_argument("--n_active", type=float, default=1e9,
                   help="activated parameters N_a for the numeric cross-check and the loss (default 1e9)")
    pl = sub.add_parser("plot", help="loss vs activated parameters for several S, to a PNG")
    pl.add_argument("--out", required=True, help="PNG path")
    pl.add_argument("--csv", help="runs to draw as points; the curves are their fit unless constants are given")
    _add_columns(pl)
    pl.add_argument("--sparsities", type=float, nargs="+", help="curves to draw (default: the CSV's S values)")
    _add_preset(pl)
    _add_constants(pl, paper_default=False)
    args = p.parse_args(argv)
    if args.cmd == "fit":
        print(fit_report(args.csv, args.n_col, args.s_col, args.loss_col, args.bootstrap, args.level, args.seed))
    elif args.cmd == "optimum":
        print(optimum_report(_constants(args) or PAPER, args.n_active))
    else:
        out = plot_runs(args.out, args.csv, (args.n_col, args.s_col, args.loss_col), _constants(args), args.sparsities)
        print(f"wrote {out}")
    return 0
