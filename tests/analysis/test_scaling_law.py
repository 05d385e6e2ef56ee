"""The Q-Sparse scaling law (Eq. 15, 16, 23): optimum, fit, plot and the command line."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qsparse_jax.analysis import scaling_law as sl
from qsparse_jax.cli.scaling_law import main as scaling_law_main

# Constants every one of which moves the loss visibly over the synthetic grid below.
TRUE = sl.LawParams(E=1.7, B=0.4, C=1.5, alpha=0.2, beta=0.3)
SMALL_GRID = {"E": (1.0, 2.0), "B/C": (0.01, 1.0), "C": (1.0, 10.0), "alpha": (0.1, 0.4), "beta": (0.05, 0.5)}


def synthetic_runs(p=TRUE, noise=1e-3, seed=0):
    """6 sizes x 5 sparsities from Eq. 15-16 with multiplicative log-normal noise."""
    rng = np.random.default_rng(seed)
    N = np.repeat(np.geomspace(1e5, 1e9, 6), 5)
    S = np.tile([0.0, 0.3, 0.5, 0.7, 0.8], 6)
    return N, S, sl.loss(N, S, p) * np.exp(rng.normal(0.0, noise, N.size))


def write_csv(path, rows, header="N,S,loss"):
    path.write_text(header + "\n" + "\n".join(",".join(str(v) for v in r) for r in rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def fitted():
    N, S, L = synthetic_runs()
    return sl.fit_law(N, S, L, grid=SMALL_GRID)


# --- Eq. 15, 16, 23 -----------------------------------------------------------------------------------

def test_amplitude_is_eq16():
    S = np.array([0.0, 0.4, 0.9])
    assert np.allclose(sl.amplitude(S, sl.PAPER), 0.01 + 1.89 * np.exp(0.05 / (1 - S)))


def test_eq23_is_eq15_at_total_params_na_over_1_minus_s():
    N_a, S = np.geomspace(1e6, 1e10, 5), np.linspace(0, 0.9, 5)
    assert np.allclose(sl.loss_activated(N_a, S, sl.PAPER), sl.loss(N_a / (1 - S), S, sl.PAPER))


# --- inference-optimal sparsity ---------------------------------------------------------------------

def test_paper_rounded_constants_give_s_star_50_2_percent():
    s = sl.optimal_sparsity(sl.PAPER)
    assert s == pytest.approx(0.5024, abs=5e-4)
    assert 1 / (1 - s) == pytest.approx(2.01, abs=0.01)


def test_beta_0547_reproduces_the_reported_45_6_percent_and_1_84x():
    s = sl.optimal_sparsity(sl.LawParams(E=1.86, B=0.01, C=1.89, alpha=0.10, beta=0.0547))
    assert s == pytest.approx(0.4558, abs=5e-4)
    assert 1 / (1 - s) == pytest.approx(1.84, abs=0.005)


def test_bitnet158_preset_gives_the_reported_61_25_percent_and_2_58x():
    p = sl.PRESETS["bitnet158"]
    s = sl.optimal_sparsity(p)
    assert round(100 * s, 2) == 61.25  # the paper's 1.58-bit S*, to its printed precision
    assert round(1 / (1 - s), 2) == 2.58
    assert sl.optimal_sparsity_numeric(p) == pytest.approx(s, abs=1e-6)
    # only β differs from the printed full-precision constants, and it is the one that solves for 61.25 %
    assert (p.E, p.B, p.C, p.alpha) == (sl.PAPER.E, sl.PAPER.B, sl.PAPER.C, sl.PAPER.alpha)
    assert p.beta == pytest.approx(sl.beta_for_optimum(0.6125), abs=1e-5)


def test_fp_preset_gives_the_reported_45_6_percent_and_the_paper_preset_is_the_printed_constants():
    assert sl.PRESETS["paper"] == sl.PAPER
    s = sl.optimal_sparsity(sl.PRESETS["fp"])
    assert s == pytest.approx(0.4558, abs=5e-4) and round(1 / (1 - s), 2) == 1.84
    solved = sl.LawParams(1.86, 0.01, 1.89, 0.10, sl.beta_for_optimum(0.4558))
    assert sl.optimal_sparsity(solved) == pytest.approx(0.4558, abs=1e-9)


def test_u_star_solves_the_first_order_condition():
    for p in (sl.PAPER, TRUE, sl.LawParams(1.0, 5.0, 0.5, 0.3, 0.2)):
        u = sl.optimal_u(p)
        assert u == pytest.approx(p.alpha * (1 + p.B / p.C * math.exp(-u)), rel=1e-12)


@pytest.mark.parametrize("p", [sl.PAPER, sl.LawParams(1.86, 0.01, 1.89, 0.10, 0.0547), TRUE,
                               sl.LawParams(1.0, 5.0, 0.5, 0.3, 0.2)])
def test_s_star_equals_direct_minimization_at_every_activated_budget(p):
    s_star = sl.optimal_sparsity(p)
    for n_a in (1e6, 1e9, 1e12):
        assert sl.optimal_sparsity_numeric(p, n_a) == pytest.approx(s_star, abs=1e-6)


def test_s_star_is_a_minimum_of_eq23():
    s = sl.optimal_sparsity(sl.PAPER)
    at = lambda x: float(sl.loss_activated(1e9, x, sl.PAPER))
    assert at(s) < min(at(0.0), at(s - 0.05), at(s + 0.05), at(0.95))


def test_dense_is_optimal_when_the_stationary_point_is_below_zero():
    p = sl.LawParams(E=1.0, B=0.0, C=1.0, alpha=0.1, beta=0.5)  # u* = α = 0.1 < β: S = 1 − 5 < 0
    assert sl.optimal_sparsity(p) == 0.0
    assert sl.optimal_sparsity_numeric(p) == pytest.approx(0.0, abs=1e-6)


def test_optimum_rejects_constants_without_an_interior_optimum():
    with pytest.raises(sl.ScalingLawError, match="beta > 0"):
        sl.optimal_sparsity(sl.LawParams(1.86, 0.01, 1.89, 0.1, -0.05))


# --- fitting ------------------------------------------------------------------------------------------

def test_objective_gradient_matches_finite_differences():
    N, S, L = synthetic_runs(noise=0.02)
    args = (np.log(N), 1 / (1 - S), np.log(L), 0.05)  # a large δ so both Huber regimes occur
    theta = np.log([1.5, 0.2, 2.0, 0.25, 0.2])
    _, g = sl._objective(theta, *args)
    eps = 1e-6
    fd = [(sl._objective(theta + eps * e, *args)[0] - sl._objective(theta - eps * e, *args)[0]) / (2 * eps)
          for e in np.eye(5)]
    assert np.allclose(g, fd, rtol=1e-5, atol=1e-7)


def test_fit_recovers_known_constants_from_noisy_runs(fitted):
    p = fitted.params
    for name in ("E", "C", "alpha", "beta"):
        assert getattr(p, name) == pytest.approx(getattr(TRUE, name), rel=0.05), name
    assert p.B == pytest.approx(TRUE.B, rel=0.25)  # B trades off against C; its interval is wider
    assert sl.optimal_sparsity(fitted) == pytest.approx(sl.optimal_sparsity(TRUE), abs=0.02)
    assert fitted.rms < 2e-3  # the residual is the injected 0.1 % noise


def test_fit_takes_the_best_start_of_the_grid():
    N, S, L = synthetic_runs()
    one = sl._fit_arrays(N, S, L, sl.grid_inits(SMALL_GRID)[:1])
    best = sl.fit_law(N, S, L, grid=SMALL_GRID)
    assert best.objective <= one.objective + 1e-12


def test_bootstrap_intervals_cover_the_true_constants(fitted):
    N, S, L = synthetic_runs()
    boot = sl.bootstrap(N, S, L, n_boot=12, seed=1, start=fitted)
    assert len(boot) == 12
    for name in ("E", "alpha", "beta"):
        lo, hi = sl.percentile_interval([getattr(b, name) for b in boot])
        assert lo <= getattr(TRUE, name) <= hi and hi - lo < 0.1 * getattr(TRUE, name), name


def test_fit_needs_enough_runs_sizes_and_sparsities():
    N, S, L = synthetic_runs()
    with pytest.raises(sl.ScalingLawError, match="too few runs"):
        sl.fit_law(N[:5], S[:5], L[:5])
    two_s = S < 0.4
    with pytest.raises(sl.ScalingLawError, match="2 sparsities"):
        sl.fit_law(N[two_s], S[two_s], L[two_s])


# --- plot ---------------------------------------------------------------------------------------------

def test_plot_writes_a_small_png_with_the_runs(tmp_path, fitted):
    pytest.importorskip("matplotlib")
    out = sl.plot_law(fitted, str(tmp_path / "law.png"), runs=synthetic_runs())
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert scaling_law_main(["plot", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install" in err and "matplotlib" in err


# --- command line -------------------------------------------------------------------------------------

def test_cli_optimum_prints_both_paper_facts(capsys):
    assert scaling_law_main(["optimum"]) == 0
    out = capsys.readouterr().out
    assert "S* = 50.24 %" in out and "S = 50.24 %" in out  # first-order condition and direct minimization
    assert scaling_law_main(["optimum", "--beta", "0.0547"]) == 0
    out = capsys.readouterr().out
    assert "S* = 45.56 %" in out and "total / activated = 1.837" in out


def test_cli_optimum_preset_bitnet158(capsys):
    assert scaling_law_main(["optimum", "--preset", "bitnet158"]) == 0
    out = capsys.readouterr().out
    assert "S* = 61.25 %" in out and "S = 61.25 %" in out and "total / activated = 2.580" in out
    # a given constant overrides the preset's
    assert scaling_law_main(["optimum", "--preset", "bitnet158", "--beta", "0.05"]) == 0
    assert "S* = 50.24 %" in capsys.readouterr().out


def test_cli_fit_prints_constants_with_intervals(tmp_path, capsys):
    N, S, L = synthetic_runs()
    path = write_csv(tmp_path / "runs.csv", zip(N, S, L), header="N,S,loss")
    assert scaling_law_main(["fit", "--csv", path, "--bootstrap", "3"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert set(sl.NAMES) <= set(rows) and "95 % interval" in out and "S* = " in out
    assert float(rows["alpha"].split("|")[2]) == pytest.approx(TRUE.alpha, rel=0.05)


def test_cli_fit_reads_named_columns(tmp_path, capsys):
    N, S, L = synthetic_runs()
    path = write_csv(tmp_path / "runs.csv", [(1, n, s, l) for n, s, l in zip(N, S, L)], header="run,params,sp,val")
    assert scaling_law_main(["fit", "--csv", path, "--n_col", "params", "--s_col", "sp", "--loss_col", "val", "--bootstrap", "0"]) == 0
    assert "S* = " in capsys.readouterr().out


def test_cli_plot_from_csv_and_from_constants(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    N, S, L = synthetic_runs()
    path = write_csv(tmp_path / "runs.csv", zip(N, S, L))
    assert scaling_law_main(["plot", "--csv", path, "--out", str(tmp_path / "a.png")]) == 0
    assert scaling_law_main(["plot", "--out", str(tmp_path / "b.png"), "--sparsities", "0", "0.5", "--beta", "0.0547"]) == 0
    for name in ("a.png", "b.png"):
        assert 0 < (tmp_path / name).stat().st_size < 200_000
    assert "wrote" in capsys.readouterr().out


def _bad_inputs(tmp_path):
    N, S, L = synthetic_runs()
    good = list(zip(N, S, L))
    return {
        "missing file": (["fit", "--csv", str(tmp_path / "nope.csv")], "cannot read"),
        "missing column": (["fit", "--csv", write_csv(tmp_path / "a.csv", good, "N,S,val")], "missing column 'loss'"),
        "non-numeric": (["fit", "--csv", write_csv(tmp_path / "b.csv", good[:3] + [(1e6, 0.3, "nan?")] + good[4:])],
                        "b.csv:5: column 'loss' is not a number"),
        "S outside [0, 1)": (["fit", "--csv", write_csv(tmp_path / "c.csv", good[:-1] + [(1e6, 1.0, 2.0)])], "S must be in [0, 1)"),
        "too few runs": (["fit", "--csv", write_csv(tmp_path / "d.csv", good[:4])], "too few runs"),
        "unknown option": (["fit", "--csv", "x.csv", "--bogus"], "unrecognized arguments: --bogus"),
        "unknown subcommand": (["refit"], "invalid choice"),
        "bad constants": (["optimum", "--alpha", "0"], "alpha > 0"),
        "plot bad S": (["plot", "--out", str(tmp_path / "p.png"), "--sparsities", "1.2"], "--sparsities must be in"),
    }


@pytest.mark.parametrize("case", ["missing file", "missing column", "non-numeric", "S outside [0, 1)", "too few runs",
                                  "unknown option", "unknown subcommand", "bad constants", "plot bad S"])
def test_cli_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    argv, msg = _bad_inputs(tmp_path)[case]
    try:
        rc = scaling_law_main(argv)
    except SystemExit as e:  # argparse's errors leave through sys.exit
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and msg in err, err


def test_cli_module_entry_point_exits_2_without_traceback(tmp_path):
    qsparse = str(Path(sys.executable).with_name("qsparse"))  # the console script, as a user runs it
    out = subprocess.run([qsparse, "scaling-law", "fit", "--csv", str(tmp_path / "missing.csv")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip() == f"error: cannot read {tmp_path / 'missing.csv'}: " \
                                                         "No such file or directory"


def test_cli_fit_reports_bootstrap_progress_on_stderr(tmp_path, capsys, monkeypatch, fitted):
    """``--bootstrap 200`` runs for minutes: its resamples are reported on stderr (plain lines in a log, here
    every one with ``QSPARSE_PROGRESS_S=0``), the table alone on stdout. Each refit returns the full-data fit
    here: the test is about the reporting, the fits are tested above."""
    monkeypatch.setenv("QSPARSE_PROGRESS_S", "0")
    monkeypatch.setattr(sl, "_fit_arrays", lambda *a, **k: fitted)
    N, S, L = synthetic_runs()
    path = write_csv(tmp_path / "runs.csv", zip(N, S, L), header="N,S,loss")
    assert scaling_law_main(["fit", "--csv", path, "--bootstrap", "2"]) == 0
    out, err = capsys.readouterr()
    assert "resamples" not in out and "\r" not in err and "S* = " in out
    assert "scaling-law bootstrap: 1/2 resamples, " in err and "scaling-law bootstrap: 2/2 resamples, done in " in err
    sl.bootstrap(N, S, L, 2, start=fitted)  # the library function is quiet unless asked
    assert capsys.readouterr().err == ""
