"""Every command the README and the configs' recipe headers document works as written: each parses with
exactly the flags it shows, and the ones that run in seconds on a CPU are run exactly as written (the
workflow from training the tiny model to the AST recipe runs in ``tests/test_docs_run.py``)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from qsparse_jax import cli
from qsparse_jax.cli import common
from qsparse_jax.config import MeshConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
QSPARSE = str(Path(sys.executable).with_name("qsparse"))


def readme_commands() -> list[str]:
    """The ``qsparse ...`` and ``python train.py ...`` lines of the README's bash blocks, continuation lines
    joined and comments cut; usage synopses (``[optional]``, ``A | B``) and shell syntax left out."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if not re.match(r"(qsparse|python train\.py) ", line) or "[" in line or " | " in line:
                continue
            out.append(line.replace("$S", "0"))
    return out


def recipe_commands() -> list[tuple[str, str]]:
    """``(config file, command)`` of the ``qsparse ...`` / ``python train.py ...`` lines in the configs' comment
    headers, continuation lines joined and trailing comments cut."""
    out = []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        header = "\n".join(line[1:] for line in path.read_text().splitlines() if line.startswith("#"))
        for line in re.sub(r"\\\n\s*", " ", header).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if re.match(r"(qsparse|python train\.py) ", line) and "[" not in line and " | " not in line:
                out.append((path.name, line))
    return out


COMMANDS = readme_commands()
RECIPES = recipe_commands()


def argv_of(line: str) -> list[str]:
    """A documented line as the shell splits it, as ``qsparse``'s arguments (``python train.py`` is ``train``)."""
    words = shlex.split(line)
    return ["train", *words[2:]] if words[0] == "python" else words[1:]


class _Parsed(BaseException):  # not an Exception: passes the commands' error wrapper untouched
    def __init__(self, unknown):
        self.unknown = unknown


def parse_only(monkeypatch, argv: list[str]) -> list[str]:
    """Run a command's entry with its parser stopped right after parsing: the arguments it did not know.
    (``parse_intermixed_args`` parses twice inside ``parse_known_intermixed_args``: stopped after both.)"""
    depth = [0]

    def stopping(original):
        def parse(self, args=None, namespace=None):
            depth[0] += 1
            try:
                ns, unknown = original(self, args, namespace)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                raise _Parsed(unknown)
            return ns, unknown
        return parse

    for name in ("parse_known_args", "parse_known_intermixed_args"):
        monkeypatch.setattr(common.Parser, name, stopping(getattr(common.Parser, name)))
    module, entry, _ = cli.COMMANDS[argv[0]]
    import importlib

    with pytest.raises(_Parsed) as parsed:
        getattr(importlib.import_module(f"qsparse_jax.cli.{module}"), entry)(argv[1:])
    return parsed.value.unknown


def test_the_readme_documents_commands():
    assert len(COMMANDS) >= 20
    assert {c.split()[1] for c in COMMANDS if c.startswith("qsparse ")} >= {
        "prepare", "compile", "import-hf", "export-hf", "prune", "lte", "generate", "lm-eval", "bench", "scaling-law"}


@pytest.mark.parametrize("line", [c for c in COMMANDS if not c.startswith("qsparse lm-eval")])
def test_readme_command_parses_with_the_flags_it_shows(line, monkeypatch):
    argv = argv_of(line)
    assert argv[0] in cli.COMMANDS, f"{line}: no such command"
    assert parse_only(monkeypatch, argv) == [], f"{line}: unknown arguments"


def test_the_configs_document_recipes():
    assert {name for name, _ in RECIPES} >= {"ast-tiny.yaml", "lte-tiny-stage1.yaml", "ast-llama2-7b.yaml"}
    assert ("ast-tiny.yaml", "python train.py --config configs/ast-tiny.yaml --init_from runs/tiny/checkpoints "
            "--workdir runs/ast-tiny") in RECIPES


@pytest.mark.parametrize("name,line", RECIPES)
def test_config_recipe_command_parses_and_names_an_existing_config(name, line, monkeypatch):
    argv = argv_of(line)
    assert argv[0] in cli.COMMANDS, f"{name}: {line}: no such command"
    assert parse_only(monkeypatch, argv) == [], f"{name}: {line}: unknown arguments"
    if "--config" in argv:
        assert (ROOT / argv[argv.index("--config") + 1]).is_file(), f"{name}: {line}: no such config"


def test_readme_lm_eval_commands_use_lm_eval_flags():
    lines = [c for c in COMMANDS if c.startswith("qsparse lm-eval")]
    assert lines
    pytest.importorskip("lm_eval")
    # lm-eval 0.4.13 documents its evaluation flags under `run` (the default command)
    helptext = subprocess.run([QSPARSE, "lm-eval", "run", "--help"], capture_output=True, text=True, timeout=300).stdout
    for line in lines:
        for flag in re.findall(r"(--[a-z_]+)", line):
            assert re.search(rf"{flag}\b", helptext), f"{line}: lm-eval has no {flag}"


def run_as_written(line: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    words = shlex.split(line)
    cmd = [QSPARSE, *words[1:]] if words[0] == "qsparse" else [sys.executable, *words[1:]]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_readme_scaling_law_optimum_prints_the_papers_optimum():
    line = next(c for c in COMMANDS if c.startswith("qsparse scaling-law optimum"))
    out = run_as_written(line)
    assert out.returncode == 0, out.stderr
    assert "50.24" in out.stdout  # the README's comment: S* = 50.24 % with the rounded constants


def test_readme_compile_on_8_simulated_devices_fits():
    """The README's ``train.py --compile_only`` form, run as written: ``mesh.fsdp=-1`` on the command line takes
    the devices from tiny.yaml's ``mesh.data: -1`` (which becomes 1, with a note) instead of failing with
    "at most one mesh axis may be -1". The ``qsparse compile`` line is the same command (parsed above; its
    overrides are checked here)."""
    line = next(m for m in re.findall(r"`(python train\.py [^`]*--compile_only[^`]*)`", (ROOT / "README.md").read_text())
                if "--cpu_devices 8" in m)
    assert line.endswith("--cpu_devices 8 mesh.fsdp=-1"), line
    out = run_as_written(line)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "mesh data=1 fsdp=8 tensor=1" in out.stdout, out.stdout
    assert "note: mesh.fsdp=-1 takes all devices, so mesh.data (-1 in configs/tiny.yaml) is 1" in out.stderr
    compile_line = next(c for c in COMMANDS if c.startswith("qsparse compile") and "--cpu_devices 8" in c)
    overrides = [w for w in argv_of(compile_line) if "=" in w]
    assert load_config(str(ROOT / "configs/tiny.yaml"), overrides).mesh == MeshConfig(data=1, fsdp=-1, tensor=1)
