"""``qsparse_jax/progress.py``: a tqdm bar on a terminal; in a log, plain lines (no ``\\r``) at most every
``QSPARSE_PROGRESS_S`` seconds and a last one when done; nothing for a job shorter than that (issue 19)."""

import io
import re

import numpy as np
import pytest

from qsparse_jax import progress
from qsparse_jax.progress import Progress, duration, track


class Log(io.StringIO):
    """A log file: not a terminal."""

    def isatty(self):
        return False


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def _no_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(progress.ENV, raising=False)


def test_in_a_log_plain_lines_with_count_elapsed_and_time_left():
    log = Log()
    with Progress(4, "prune sparsegpt 2:4", "layers", every=0, stream=log) as p:
        for _ in range(4):
            p.update()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("prune sparsegpt 2:4: 1/4 layers, ") and re.search(r", ~\d+ s left$", lines[0])
    assert [l.split(": ")[1].split(",")[0] for l in lines] == ["1/4 layers", "2/4 layers", "3/4 layers", "4/4 layers"]
    assert re.fullmatch(r"prune sparsegpt 2:4: 4/4 layers, done in \d+ s", lines[-1])


def test_a_short_job_in_a_log_prints_nothing():
    log = Log()
    for _ in track(range(50), "scoring", unit="requests", every=10.0, stream=log):
        pass
    assert log.getvalue() == ""


def test_lines_come_at_most_every_interval(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    log = Log()
    p = Progress(100, "bootstrap", "resamples", stream=log, every=10.0)
    for _ in range(100):
        clock[0] += 0.5  # one unit every 0.5 s: 50 s in all -> a line at 10, 20, 30, 40 s, then the last one
        p.update()
    p.close()
    lines = log.getvalue().splitlines()
    assert [l.split(": ")[1].split(",")[0] for l in lines] == [
        "20/100 resamples", "40/100 resamples", "60/100 resamples", "80/100 resamples", "100/100 resamples"]
    assert lines[0] == "bootstrap: 20/100 resamples, 10 s, ~40 s left" and lines[-1].endswith("done in 50 s")


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv(progress.ENV, "2.5")
    assert progress.interval() == 2.5 and Progress(1, "x", enabled=False).every == 2.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(progress.ENV, bad)
        assert progress.interval() == progress.DEFAULT_INTERVAL


def test_on_a_terminal_a_tqdm_bar_unless_ci(monkeypatch):
    term = Terminal()
    p = Progress(3, "generate_until", "requests", stream=term)
    assert p.bar is not None
    p.update(3)
    p.close()
    assert "generate_until" in term.getvalue() and "3/3" in term.getvalue()
    monkeypatch.setenv("CI", "true")
    assert not progress.interactive(Terminal())
    assert Progress(3, "x", stream=Terminal()).bar is None


def test_disabled_is_silent_and_unknown_totals_count():
    log = Log()
    with Progress(3, "x", stream=log, every=0, enabled=False) as p:
        p.update(3)
    assert log.getvalue() == ""
    with Progress(None, "calibration", "batches", stream=log, every=0) as p:
        p.update(2)
    assert log.getvalue().splitlines()[0].startswith("calibration: 2 batches, ")


def test_durations():
    assert [duration(s) for s in (0, 41.4, 99, 312, 7500, float("nan"), -1)] == [
        "0 s", "41 s", "99 s", "5 min 12 s", "2 h 05 min", "?", "?"]


def test_scoring_reports_requests_in_a_log(monkeypatch, capsys):
    """Evaluation (``infer/evaluate.py``'s Scorer, also lm-eval's loglikelihood) through the shared utility: plain
    lines on stderr when it is not a terminal (pytest's capture is not)."""
    import jax.numpy as jnp

    from qsparse_jax.infer.evaluate import Scorer, make_batches

    monkeypatch.setenv(progress.ENV, "0")

    def apply(params, tokens):
        return jnp.zeros(tokens.shape + (8,)) + params

    pairs = [([1, 2], [3]), ([1], [2, 3, 4]), ([5, 6, 7], [1])]
    ll, _ = Scorer(apply, jnp.float32(0.0))(make_batches(pairs, 16, 2, None), desc="dense: perplexity")
    assert np.allclose(ll, [-np.log(8) * 1, -np.log(8) * 3, -np.log(8) * 1])
    err = capsys.readouterr().err
    assert "\r" not in err and re.search(r"^dense: perplexity: 3/3 requests, done in \d+ s$", err, re.M), err
