"""Scaling-law sweep and ablations for the Q-Sparse reproduction study.

    python studies/sweep.py [--grid studies/grid.yaml] [--out studies/runs] [--results studies/results]
                            [--collect_only] [--only NAME ...] [--compare OTHER/sweep.csv]

Trains every run of the grid (sizes x sparsities, then the ablation runs) with
``qsparse_jax.train.loop.train``, one directory per run under ``--out``. A run whose directory holds
``result.json`` is finished and skipped; an interrupted one resumes from its last checkpoint (the
trainer does that). Then it writes into ``--results``:

- ``runs.csv``: one row per finished run: N (non-embedding projection parameters), N_total, N_a
  (activated projection parameters, ``Σ (1 − S)·|W_p|``), S (top-K sparsity), the measured overall
  sparsity (top-K plus the zeros ReLU² makes), final validation loss (nats/byte), wall time;
- ``ablations.md``: the ablation tables (final validation losses);
- ``sweep.md``: the sweep's losses, and their gaps to dense at equal total and equal activated parameters;
- ``fit.md`` and ``scaling_law.png``: the fit of Eq. 15-16 to the sweep runs (not the ablations)
  with bootstrap intervals, S*, and the loss-vs-activated-parameters plot (with ``--compare``: a second
  sweep's law in the same plot and its constants beside these; ``studies/grid_b158.yaml``, the 1.58-bit
  sweep, is compared with the full-precision one so).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
GROUPS = ("qkv", "out", "gate_up", "down")
CSV_FIELDS = ("run", "kind", "N", "N_total", "N_a", "S", "S_measured", "S_down_measured", "loss", "steps", "tokens",
              "wall_s")


def run_name(size: str, s: float) -> str:
    return f"{size}_s{s:g}" if s else f"{size}_s0.0"


def plan(grid: dict) -> list[dict]:
    """Every run of the grid: name, kind (sweep | ablation), nominal S and dotted overrides."""
    runs = []
    for s in grid["sparsities"]:
        for size, over in grid["sizes"].items():
            runs.append({"name": run_name(size, float(s)), "kind": "sweep", "S": float(s),
                         "overrides": {**grid["common"], **over, **{f"model.sparsity.{g}": float(s) for g in GROUPS}}})
    size = grid.get("ablation_size")
    for name, spec in grid.get("ablation_runs", {}).items():
        spec = dict(spec)
        s = float(spec.pop("sparsity"))
        runs.append({"name": name, "kind": "ablation", "S": s,
                     "overrides": {**grid["common"], **grid["sizes"][size],
                                   **{f"model.sparsity.{g}": s for g in GROUPS}, **spec}})
    return runs


def build_config(grid: dict, run: dict):
    from qsparse_jax.config import load_config

    return load_config(str(REPO / grid["base"]), [f"{k}={v}" for k, v in run["overrides"].items()])


def train_run(grid: dict, run: dict, out: Path) -> dict | None:
    """Train one run to completion (resuming if interrupted); None when stopped by a signal."""
    from qsparse_jax.nn.model import activated_params
    from qsparse_jax.train.loop import train

    workdir = out / run["name"]
    cfg = build_config(grid, run)
    t0 = time.time()
    metrics = train(cfg, workdir)
    if "stopped_at" in metrics:
        return None
    acct = activated_params(cfg.model, {g: getattr(cfg.model.sparsity, g) for g in ("qkv", "out", "down")}
                            | {"up": cfg.model.sparsity.gate_up, "gate": cfg.model.sparsity.gate_up})
    result = {"run": run["name"], "kind": run["kind"], "N": acct["N_proj"], "N_total": acct["N_total"],
              "N_a": acct["N_a"], "S": run["S"], "S_measured": metrics["sparsity"]["overall"],
              "loss": metrics["val_loss"], "steps": cfg.train.steps,
              "tokens": cfg.train.steps * cfg.data.batch_size * cfg.data.seq_len,
              "wall_s": round(time.time() - t0, 1), "overrides": run["overrides"]}
    (workdir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def collect(runs: list[dict], out: Path) -> list[dict]:
    """result.json of every finished run, plus the measured down-projection input sparsity from the
    last line of its metrics.jsonl (ReLU² makes it sparse even without top-K)."""
    rows = []
    for run in runs:
        path = out / run["name"] / "result.json"
        if path.is_file():
            r = json.loads(path.read_text())
            last = (out / run["name"] / "metrics.jsonl").read_text().strip().splitlines()[-1]
            r["S_down_measured"] = json.loads(last)["sparsity"]["down"]
            rows.append(r)
    return rows


def write_csv(rows: list[dict], path: Path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "S_measured": f"{r['S_measured']:.4f}", "loss": f"{r['loss']:.5f}",
                        "S_down_measured": f"{r['S_down_measured']:.4f}",
                        "N": int(r["N"]), "N_total": int(r["N_total"]), "N_a": int(round(r["N_a"]))})


def ablation_tables(grid: dict, rows: list[dict]) -> str:
    """Markdown: one table per ablation, final validation loss (nats/byte) of each arm."""
    by_name = {r["run"]: r for r in rows}
    lines = [f"# Ablations at size {grid['ablation_size']} (final validation loss, nats/byte)", ""]
    for ab in grid["ablations"]:
        lines += [f"## {ab['title']}", "", "| arm | run | top-K S | measured sparsity (overall / down input) | N_a | val loss | Δ vs first |",
                  "|---|---|---|---|---|---|---|"]
        first = None
        for arm, name in ab["runs"].items():
            r = by_name.get(name)
            if r is None:
                lines.append(f"| {arm} | {name} | | | | not run | |")
                continue
            first = r["loss"] if first is None else first
            lines.append(f"| {arm} | {name} | {r['S']:.2f} | {r['S_measured']:.3f} / {r['S_down_measured']:.3f} | {r['N_a']:,.0f} | "
                         f"{r['loss']:.4f} | {r['loss'] - first:+.4f} |")
        lines.append("")
    return "\n".join(lines)


def sweep_tables(rows: list[dict]) -> str:
    """Markdown: the sweep's final losses (size x S), the gap to dense at the same total N, and the
    gap to dense at the same activated N_a (dense loss interpolated linearly in log N_a between the
    two dense runs around it; blank outside the dense runs' range)."""
    sweep = [r for r in rows if r["kind"] == "sweep"]
    sizes = sorted({r["N"] for r in sweep})
    sps = sorted({r["S"] for r in sweep})
    at = {(r["N"], r["S"]): r for r in sweep}
    dense = sorted((r["N_a"], r["loss"]) for r in sweep if r["S"] == 0)

    def dense_at(n_a):
        for (x0, y0), (x1, y1) in zip(dense, dense[1:]):
            if x0 <= n_a <= x1:
                return y0 + (y1 - y0) * math.log(n_a / x0) / math.log(x1 / x0)
        return None

    head = "| N (non-embedding) | " + " | ".join(f"S = {s:g}" for s in sps) + " |"
    rule = "|---|" + "---|" * len(sps)
    out = ["# Sweep: final validation loss (nats/byte)", "", head, rule]
    for n in sizes:
        out.append(f"| {n:,.0f} | " + " | ".join(f"{at[n, s]['loss']:.4f}" if (n, s) in at else "" for s in sps) + " |")
    out += ["", "## Loss minus the dense loss at the same total N (Eq. 15 predicts (A(S) − A(0)) / N^α, "
            "shrinking with N)", "", head, rule]
    for n in sizes:
        d = at.get((n, 0.0))
        out.append(f"| {n:,.0f} | " + " | ".join(f"{at[n, s]['loss'] - d['loss']:+.4f}" if d and (n, s) in at else ""
                                                  for s in sps) + " |")
    out += ["", "## Sparse vs dense per activated parameter (negative: the sparse model is better, as Eq. 23 "
            "predicts for 0 < S ≤ S*)", "",
            "Two bounds: (a) the dense loss interpolated linearly in log N_a between the dense runs around "
            "N_a: the loss curve is convex in log N_a, so this chord overstates the dense loss (favours "
            "sparse); (b) the dense run with the fewest activated parameters ≥ N_a: it has more activated "
            "parameters (favours dense).", "",
            "| run | N_a | loss | (a) interpolated dense | (a) difference | (b) dense run (N_a) | (b) difference |",
            "|---|---|---|---|---|---|---|"]
    for r in sweep:
        if r["S"] == 0:
            continue
        d = dense_at(r["N_a"])
        bigger = [x for x in sweep if x["S"] == 0 and x["N_a"] >= r["N_a"]]
        nb = min(bigger, key=lambda x: x["N_a"]) if bigger else None
        out.append(f"| {r['run']} | {r['N_a']:,.0f} | {r['loss']:.4f} | "
                   + (f"{d:.4f} | {r['loss'] - d:+.4f} | " if d is not None else " | | ")
                   + (f"{nb['run']} ({nb['N_a']:,.0f}) | {r['loss'] - nb['loss']:+.4f} |" if nb else " | |"))
    return "\n".join(out) + "\n"


def plot_two_laws(fits: list, runs: list, labels: list[str], out: Path, title: str):
    """One plot, loss vs activated parameters N_a (Eq. 23): each law's curve per S (colour: S; line
    style: law) with its runs as points (filled: first law, hollow: second), and each law's S* curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from qsparse_jax.analysis import scaling_law as sl

    sps = sorted({float(s) for r in runs for s in r[1]})
    na_all = np.concatenate([(1 - r[1]) * r[0] for r in runs])
    x = np.geomspace(na_all.min() / 1.5, na_all.max() * 1.5, 200)
    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=100)
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(sps)))
    styles = ("-", "--")
    for k, (fit, (N, S, L), label) in enumerate(zip(fits, runs, labels)):
        p = fit.params
        for s, col in zip(sps, colors):
            ax.plot(x, sl.loss_activated(x, s, p), styles[k], color=col, lw=1.4,
                    label=f"{label}, S = {s:g}")
            m = np.isclose(S, s)
            ax.scatter((1 - s) * N[m], L[m], s=26, zorder=3, edgecolors=col,
                       facecolors=col if k == 0 else "none")
        s_star = sl.optimal_sparsity(p)
        ax.plot(x, sl.loss_activated(x, s_star, p), styles[k], color="k", lw=1.0,
                label=f"{label}, S* = {s_star:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("activated parameters N_a (non-embedding projections)")
    ax.set_ylabel("final validation loss (nats/byte)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def fit_and_plot(csv_path: Path, results: Path, n_boot: int, label: str | None = None,
                 compare: Path | None = None, compare_label: str = "full precision"):
    """Fit Eq. 15-16 with bootstrap intervals to fit.md, and the plot (with ``compare``: a second sweep's
    CSV, refitted here without bootstrap, drawn in the same plot and its S* set beside this one's)."""
    from qsparse_jax.analysis import scaling_law as sl

    data = sl.read_runs(str(csv_path), n_col="N", s_col="S", loss_col="loss")
    fit = sl.fit_law(*data)
    boot = sl.bootstrap(*data, n_boot=n_boot, seed=0)
    s_star = sl.optimal_sparsity(fit)
    lines = ["# Fit of L(N, S) = E + (B + C·exp(β/(1−S))) / N^α (Eq. 15-16) to the sweep runs"
             + (f" ({label})" if label else ""), "",
             f"N = non-embedding projection parameters; loss = final validation loss (nats/byte); "
             f"{len(data[0])} runs; Huber(δ=1e-3) on log-loss, L-BFGS, best of a grid of initializations; "
             f"95 % percentile intervals from {n_boot} bootstrap resamples of the runs.", "",
             sl.format_fit(fit, boot), "",
             f"Huber objective at the optimum: {fit.objective:.3e}; RMS log-loss residual: {fit.rms:.4f}.", "",
             f"Inference-optimal sparsity (Eq. 23) with these constants: S* = {100 * s_star:.1f} % "
             f"(total = {1 / (1 - s_star):.2f} × activated)."]
    s_boot = [sl.optimal_sparsity(b) for b in boot]
    lo, hi = sl.percentile_interval(s_boot)
    lines.append(f"Bootstrap 95 % interval of S*: [{100 * lo:.1f} %, {100 * hi:.1f} %].")
    if compare is not None:
        data2 = sl.read_runs(str(compare), n_col="N", s_col="S", loss_col="loss")
        fit2 = sl.fit_law(*data2)
        s2 = sl.optimal_sparsity(fit2)
        lines += ["", f"## Against the {compare_label} sweep (`{compare}`, refitted here without bootstrap)", "",
                  "| constant | " + (label or "this sweep") + f" | {compare_label} |", "|---|---|---|"]
        lines += [f"| {n} | {getattr(fit.params, n):.4g} | {getattr(fit2.params, n):.4g} |" for n in sl.NAMES]
        lines += [f"| S* | {100 * s_star:.1f} % | {100 * s2:.1f} % |", "",
                  "Loss difference per run (this sweep minus the other, same N and S):", "",
                  "| N | " + " | ".join(f"S = {s:g}" for s in sorted(set(data[1].tolist()))) + " |",
                  "|---|" + "---|" * len(set(data[1].tolist()))]
        other = {(float(n), float(s)): l for n, s, l in zip(*data2)}
        mine = {(float(n), float(s)): l for n, s, l in zip(*data)}
        for n in sorted(set(data[0].tolist())):
            lines.append(f"| {n:,.0f} | " + " | ".join(
                f"{mine[n, s] - other[n, s]:+.4f}" if (n, s) in other and (n, s) in mine else ""
                for s in sorted(set(data[1].tolist()))) + " |")
        plot_two_laws([fit, fit2], [data, data2], [label or "this sweep", compare_label],
                      results / "scaling_law.png",
                      f"Q-Sparse scaling law (Eq. 23), {label or 'this sweep'} (solid, filled) vs "
                      f"{compare_label} (dashed, hollow); byte-level models, 2 CPU cores")
    else:
        sl.plot_law(fit, str(results / "scaling_law.png"), runs=data,
                    title="Q-Sparse scaling law, byte-level models on 2 CPU cores")
    (results / "fit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default=str(REPO / "studies" / "grid.yaml"))
    p.add_argument("--out", default=str(REPO / "studies" / "runs"), help="one directory per run")
    p.add_argument("--results", default=str(REPO / "studies" / "results"))
    p.add_argument("--collect_only", "--collect-only", action="store_true",
                   help="do not train; rebuild the results from finished runs")
    p.add_argument("--only", nargs="*", help="train only these runs")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the fit intervals")
    p.add_argument("--compare", help="a second sweep's sweep.csv (e.g. studies/results/sweep.csv): its law in the "
                                     "same plot, its constants and S* beside this one's in fit.md")
    p.add_argument("--compare_label", default="full precision", help="that sweep's name in the plot and fit.md")
    args = p.parse_args(argv)

    grid = yaml.safe_load(Path(args.grid).read_text())
    out, results = Path(args.out), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    runs = plan(grid)
    if not args.collect_only:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
        t_all = time.time()
        for i, run in enumerate(runs):
            if args.only and run["name"] not in args.only:
                continue
            if (out / run["name"] / "result.json").is_file():
                print(f"[{i + 1}/{len(runs)}] {run['name']}: finished, skipped", flush=True)
                continue
            print(f"[{i + 1}/{len(runs)}] {run['name']}: training", flush=True)
            r = train_run(grid, run, out)
            if r is None:
                print("stopped by a signal; run again to resume", flush=True)
                return 1
            print(f"[{i + 1}/{len(runs)}] {run['name']}: val loss {r['loss']:.4f} in {r['wall_s']:.0f} s "
                  f"(sweep so far {time.time() - t_all:.0f} s)", flush=True)
    rows = collect(runs, out)
    write_csv(rows, results / "runs.csv")
    if grid.get("ablations"):
        (results / "ablations.md").write_text(ablation_tables(grid, rows))
    (results / "sweep.md").write_text(sweep_tables(rows))
    sweep_csv = results / "sweep.csv"
    write_csv([r for r in rows if r["kind"] == "sweep"], sweep_csv)
    print(f"wrote {results / 'runs.csv'} ({len(rows)} runs)" + (f" and {results / 'ablations.md'}" if grid.get("ablations") else ""))
    from qsparse_jax.analysis.scaling_law import ScalingLawError

    try:
        fit_and_plot(sweep_csv, results, args.bootstrap, grid.get("label"),
                     Path(args.compare) if args.compare else None, args.compare_label)
    except ScalingLawError as e:
        print(f"fit skipped: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
