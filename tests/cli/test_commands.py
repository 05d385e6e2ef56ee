"""The ``qsparse`` command line: every command listed and documented, one flag spelling, one-line errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qsparse_jax.cli import COMMANDS
from qsparse_jax.cli.common import Parser, snake_flags

ROOT = Path(__file__).resolve().parents[2]
QSPARSE = str(Path(sys.executable).with_name("qsparse"))  # the console script, as a user runs it
SUBCOMMANDS = {"lte": ["convert"], "scaling-law": ["fit", "optimum", "plot"],
               "bench": ["topk", "step", "kernels", "eval", "all"]}
ISSUE = re.compile(r"\bissues?\b|#\d+", re.IGNORECASE)


def qsparse(*args, **kw):
    return subprocess.run([QSPARSE, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False, **kw)


def test_help_lists_every_command_with_a_line():
    p = qsparse("--help")
    assert p.returncode == 0, p.stderr
    listed = {line.split()[0]: line for line in p.stdout.splitlines() if line.startswith("  ")}
    assert set(COMMANDS) <= set(listed)
    assert all(len(listed[c].split()) > 3 for c in COMMANDS)  # a description, not just the name
    assert not ISSUE.search(p.stdout)


def test_python_m_qsparse_jax_is_the_same_dispatcher():
    a = qsparse("--help")
    b = subprocess.run([sys.executable, "-m", "qsparse_jax", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert b.returncode == 0 and a.stdout == b.stdout


def _help_cases():
    cases = [[c] for c in COMMANDS] + [[c, s] for c, subs in SUBCOMMANDS.items() for s in subs]
    return [pytest.param(c, id=" ".join(c)) for c in cases]


@pytest.mark.parametrize("cmd", _help_cases())
def test_every_command_help_exits_0_speaks_snake_case_and_names_no_issue(cmd):
    p = qsparse(*cmd, "--help")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() and not ISSUE.search(p.stdout), ISSUE.search(p.stdout)
    if cmd[0] != "lm-eval":  # lm-eval's own flags are its own
        assert not re.search(r"(?<![\w-])--[a-z0-9]+-[a-z]", p.stdout), "a flag spelled --kebab-case in --help"


def test_prepare_and_help_do_not_import_jax():
    code = ("import sys\nfrom qsparse_jax.cli import main\n"
            "for argv in (['--help'], ['prepare', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'jax' not in sys.modules, 'qsparse prepare imported jax'\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_snake_flags_normalizes_flags_only():
    argv = ["--batch-size", "4", "--max-new-tokens=8", "data.text_field=x", "my-file.txt", "-h", "--", "--a-b"]
    assert snake_flags(argv) == ["--batch_size", "4", "--max_new_tokens=8", "data.text_field=x", "my-file.txt", "-h",
                                 "--", "--a-b"]


def test_kebab_alias_equals_its_snake_flag():
    p = Parser(prog="t")
    p.add_argument("--max_new_tokens", type=int)
    p.add_argument("overrides", nargs="*")
    assert vars(p.parse_args(["--max-new-tokens", "5", "a.b_c=1"])) == vars(p.parse_args(["--max_new_tokens", "5",
                                                                                           "a.b_c=1"]))
    # and through a real command, end to end
    snake, kebab = qsparse("scaling-law", "optimum", "--n_active", "1e8"), qsparse("scaling-law", "optimum",
                                                                                  "--n-active", "1e8")
    assert snake.returncode == kebab.returncode == 0 and snake.stdout == kebab.stdout and "S* =" in snake.stdout


@pytest.mark.parametrize("args, msg", [
    (["eval", "--hf", "x", "--batch_size", "many"], "argument --batch_size: invalid int value"),
    (["eval", "--hf", "x", "--batch-size", "many"], "argument --batch_size: invalid int value"),
    (["demo", "--seq_len", "1"], "--seq_len must be >= 2"),
    (["scaling-law", "optimum", "--alpha", "0"], "alpha > 0"),
    (["prepare", "--out", "/nonexistent-dir/x", "--merge"], "holds no prepare.json"),
    (["compile", "--config", "configs/tiny.yaml", "--sparsity", "0.5"], "go with --decode"),
    (["bogus"], "unknown command 'bogus'"),
])
def test_bad_input_is_one_stderr_line_and_exit_2(args, msg):
    p = qsparse(*args)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith("error: ") and msg in p.stderr, p.stderr


def test_train_py_is_qsparse_train():
    a = qsparse("train", "--help")
    b = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert a.returncode == b.returncode == 0
    flags = lambda text: sorted(set(re.findall(r"--\w+", text)))
    assert flags(a.stdout) == flags(b.stdout) and "--compile_only" in flags(a.stdout)
    assert b.stdout.startswith("usage: train.py")


def test_train_py_compile_only_is_qsparse_compile(tmp_path):
    args = ["--config", "configs/tiny.yaml", "--cpu_devices", "2", "model.n_layers=1"]
    a = qsparse("compile", *args, "--report_json", tmp_path / "a.json")
    b = subprocess.run([sys.executable, "train.py", "--compile_only", *args, "--report_json", str(tmp_path / "b.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert a.returncode == b.returncode == 0, a.stderr[-2000:] + b.stderr[-2000:]
    ra, rb = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    timing = {k for k in ra if "second" in k or k.endswith("_s")}
    assert ra["devices"] == 2 and {k: v for k, v in ra.items() if k not in timing} == \
           {k: v for k, v in rb.items() if k not in timing}


def test_compile_decode_with_the_packed_ternary_kernels():
    p = qsparse("compile", "--decode", "--config", "configs/300m-bitnet-qsparse.yaml", "model.dim=64", "model.n_layers=1",
                "model.n_heads=2", "model.hidden_dim=128", "model.vocab_size=256", "--kernels", "on", "--bits", "1.6",
                "--prompt_len", "8", "--max_new_tokens", "4")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "prompt 8 + 4 new tokens" in p.stdout and "decode loop" in p.stdout


def test_help_piped_into_a_reader_that_stops_early_prints_no_traceback():
    p = subprocess.Popen([QSPARSE, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the command writes
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) in (0, 141) and "Traceback" not in err, err
