"""TODO docstring (scaling_law)."""

from __future__ import annotations

import argparse
import sys

from ..analysis.scaling_law import (
    HUBER_DELTA,
    NAMES,
    PAPER,
    LawParams,
    ScalingLawError,
    _check_constants,
    bootstrap,
    fit_law,
    format_fit,
    loss_activated,
    optimal_sparsity,
    optimal_sparsity_numeric,
    optimal_u,
    percentile_interval,
    plot_law,
    read_runs,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2, as for every other bad input
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def _add_constants(p, default: LawParams | None):
    for n in NAMES:
        p.add_argument(f"--{n}", type=float, default=None if default is None else getattr(default, n),
                       help=f"constant {n}" + ("" if default is None else f" (default: paper's {getattr(default, n)})"))


def _constants(args, default: LawParams) -> LawParams:
    return LawParams(*[getattr(default, n) if getattr(args, n) is None else getattr(args, n) for n in NAMES])


def main(argv=None) -> int:
    p = _Parser(prog="python -m qsparse_jax.scaling_law", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    f = sub.add_parser("fit", help="fit Eq. 15-16 to a CSV of runs, with bootstrap intervals")
    f.add_argument("csv")
    f.add_argument("--n-col", default="N", help="total-parameter column (default N)")
    f.add_argument("--s-col", default="S", help="sparsity column (default S)")
    f.add_argument("--loss-col", default="loss", help="final-loss column (default loss)")
    f.add_argument("--bootstrap", type=int, default=200, help="resamples for the intervals (0: none)")
    f.add_argument("--level", type=float, default=95.0, help="interval level in %% (default 95)")
    f.add_argument("--seed", type=int, default=0)
    o = sub.add_parser("optimum", help="inference-optimal sparsity S* (Eq. 23) for given constants")
    _add_constants(o, PAPER)
    o.add_argument("--n-active", type=float, default=1e9, help="N_a for the numeric cross-check and loss")
    pl = sub.add_parser("plot", help="loss vs activated parameters for several S, to a PNG")
    pl.add_argument("--out", required=True, help="PNG path")
    pl.add_argument("--csv", help="runs to draw as points; the curves are their fit unless constants are given")
    pl.add_argument("--n-col", default="N")
    pl.add_argument("--s-col", default="S")
    pl.add_argument("--loss-col", default="loss")
    pl.add_argument("--sparsities", type=float, nargs="+", help="curves to draw (default: the CSV's S values)")
    _add_constants(pl, None)
    args = p.parse_args(argv)

    try:
        if args.cmd == "fit":
            if args.bootstrap < 0 or not 0 < args.level < 100:
                raise ScalingLawError("--bootstrap must be >= 0 and --level in (0, 100)")
            N, S, L = read_runs(args.csv, args.n_col, args.s_col, args.loss_col)
            fit = fit_law(N, S, L)
            boot = bootstrap(N, S, L, args.bootstrap, args.seed, start=fit) if args.bootstrap else None
            print(f"L(N, S) = E + (B + C·exp(β/(1−S))) / N^α fitted to {fit.n_runs} runs "
                  f"(Huber δ={HUBER_DELTA:g} on log-loss; RMS log residual {fit.rms:.4f})")
            print(format_fit(fit, boot, args.level))
            s_star = optimal_sparsity(fit)
            line = f"S* = {100 * s_star:.2f} % (total = {1 / (1 - s_star):.3f} × activated)"
            if boot:
                lo, hi = percentile_interval([optimal_sparsity(b) for b in boot], args.level)
                line += f", {args.level:g} % interval [{100 * lo:.2f} %, {100 * hi:.2f} %]"
            print(line)
        elif args.cmd == "optimum":
            c = _constants(args, PAPER)
            if not args.n_active > 0:
                raise ScalingLawError(f"--n-active must be positive, got {args.n_active:g}")
            s_star = optimal_sparsity(c)
            s_num = optimal_sparsity_numeric(c, args.n_active)
            print(f"S* = {100 * s_star:.2f} %  (u* = β/(1−S*) = {optimal_u(c):.6f}; total / activated = "
                  f"{1 / (1 - s_star):.3f})")
            print(f"direct minimization of Eq. 23 at N_a = {args.n_active:g}: S = {100 * s_num:.2f} %, "
                  f"loss {float(loss_activated(args.n_active, s_star, c)):.4f} vs dense "
                  f"{float(loss_activated(args.n_active, 0.0, c)):.4f}")
        else:
            runs = read_runs(args.csv, args.n_col, args.s_col, args.loss_col) if args.csv else None
            given = [getattr(args, n) for n in NAMES]
            if runs is not None and all(v is None for v in given):
                law = fit_law(*runs).params
            else:
                law = _constants(args, PAPER)
                _check_constants(law)
            if args.sparsities and any(not 0 <= s < 1 for s in args.sparsities):
                raise ScalingLawError(f"--sparsities must be in [0, 1), got {args.sparsities}")
            print(f"wrote {plot_law(law, args.out, runs, args.sparsities)}")
    except ScalingLawError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the PNG's directory does not exist
        print(f"error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 2
    return 0

