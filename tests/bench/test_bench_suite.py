"""``qsparse bench all --quick``: the one-call accelerator benchmark runs end to end on the CPU
(a smoke test; on a GPU / TPU the same command without --quick records benchmarks/RESULTS.md's rows)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def bench(*args):
    qsparse = str(Path(sys.executable).with_name("qsparse"))  # the console script, as a user runs it
    return subprocess.run([qsparse, "bench", "all", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_quick_run_writes_the_markdown_and_json_report(tmp_path):
    p = bench("--quick", "--out", str(tmp_path / "r"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    md = (tmp_path / "r" / "report.md").read_text()
    assert md == p.stdout
    assert rep["ok"] and rep["device"]["backend"] == "cpu" and rep["quick"]
    assert list(rep["sections"]) == ["checks", "kernels", "step", "decode"]
    checks = rep["sections"]["checks"]["rows"]
    assert all(r["ok"] for r in checks) and any("sharded" in r["check"] for r in checks)
    assert {r["variant"] for r in rep["sections"]["kernels"]["rows"]} >= {"dense bf16", "qsparse xla"}
    assert [r["variant"] for r in rep["sections"]["step"]["rows"]] == ["dense", "q-sparse"]
    assert [r["variant"] for r in rep["sections"]["decode"]["rows"]] == ["dense", "sparse", "sparse + kernels"]
    for title in ("## checks", "## kernels", "## step", "## decode", "checks passed"):
        assert title in md


def test_budget_skips_later_sections_and_mistakes_exit_2(tmp_path):
    p = bench("--quick", "--out", str(tmp_path / "r"), "--sections", "kernels,step", "--budget_s", "0.001")
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert "rows" in rep["sections"]["kernels"] and "budget" in rep["sections"]["step"]["skipped"]
    bad = bench("--out", str(tmp_path / "x"), "--sections", "checks,speed")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --sections takes a comma-separated subset of checks,kernels,step,decode, got 'checks,speed'"]
    assert bench().returncode == 2  # --out is required
