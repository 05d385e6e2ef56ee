"""The package's shape, read from its source (``ast``; nothing is imported): no import cycle, each layer imports
only from itself and the layers below, few function-local imports of the package and each says why, no module
over 600 lines, every module's docstring opens with its one job (issue 18)."""

from __future__ import annotations

import ast
import functools
import io
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "qsparse_jax"
SRC = Path(__file__).resolve().parents[1] / PACKAGE

# Bottom to top; a module may import from its own layer and those before it. The package's own
# ``__init__`` ("") runs before any of its modules, so it sits at the bottom (its exports are imported on
# first use, by name); ``python -m qsparse_jax`` (``__main__``) at the top.
LAYERS = [
    {"", "errors", "_quiet_tpu", "progress"},
    {"ops"},
    {"kernels"},
    {"config", "config_model"},
    {"nn"},
    {"data"},
    {"checkpoints"},
    {"train"},
    {"infer"},
    {"transforms", "analysis", "testing"},
    {"bench"},
    {"cli"},
    {"__main__"},
]
MAX_LOCAL_IMPORTS = 10
MAX_LINES = 600
PLACEHOLDER = re.compile(r"\b(TODO|FIXME|XXX|TBD)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # the package module it names
    path: Path
    lineno: int
    end_lineno: int
    local: bool  # inside a function body

    def where(self) -> str:
        return f"{self.path.relative_to(SRC.parent)}:{self.lineno} ({self.importer} -> {self.target})"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


@functools.cache
def trees() -> dict[str, ast.Module]:
    return {name: ast.parse(p.read_text(), str(p)) for name, p in modules().items()}


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from X import ...`` names (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    is_package = modules()[importer].name == "__init__.py"
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(importer: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The package's modules an import statement names: ``from pkg import sub`` names ``pkg.sub`` where that is a
    module, else ``pkg``; ``import a.b.c`` names its longest prefix that is a module."""
    mods = modules()
    out = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            parts = alias.name.split(".")
            for n in range(len(parts), 0, -1):
                if ".".join(parts[:n]) in mods:
                    out.append(".".join(parts[:n]))
                    break
        return out
    base = _resolve(importer, node)
    for alias in node.names:
        if f"{base}.{alias.name}" in mods:
            out.append(f"{base}.{alias.name}")
        elif base in mods:
            out.append(base)
    return out


def _walk(node: ast.AST, local: bool = False):
    """(statement, inside a function) for every node below ``node``."""
    for child in ast.iter_child_nodes(node):
        yield child, local
        yield from _walk(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def _dynamic_target(node: ast.Call) -> str | None:
    """``importlib.import_module(".x", __name__)`` / ``__import__("qsparse_jax.x")``: the package module it names
    (``"?"`` where the name is computed), or None for any other call."""
    f = node.func
    fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if fname not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    head = arg.value if isinstance(arg, ast.Constant) else (
        arg.values[0].value if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant)
        else "")
    if not isinstance(head, str) or not (head.startswith(".") or head.split(".")[0] == PACKAGE):
        return None
    return head if isinstance(arg, ast.Constant) and head.split(".")[0] == PACKAGE and head in modules() else "?"


@functools.cache
def imports() -> tuple[Import, ...]:
    """Every import of one of the package's own modules, module-level and function-local, anywhere in the package;
    an ``import_module`` of one of them counts too (its target ``"?"`` where the name is computed at run time)."""
    out = []
    for name, tree in trees().items():
        for node, local in _walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out += [Import(name, t, modules()[name], node.lineno, node.end_lineno, local)
                        for t in dict.fromkeys(_targets(name, node))]
            elif isinstance(node, ast.Call) and (t := _dynamic_target(node)) is not None:
                out.append(Import(name, t, modules()[name], node.lineno, node.end_lineno, local))
    return tuple(out)


def static_imports() -> list[Import]:
    """The imports whose target module is known from the source."""
    return [i for i in imports() if i.target != "?"]


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (iterative depth-first search)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for root in sorted(graph):
        if colour[root] != WHITE:
            continue
        stack, path = [(root, iter(sorted(graph[root])))], [root]
        colour[root] = GREY
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = BLACK
                stack.pop()
                path.pop()
            elif colour[child] == GREY:
                return path[path.index(child):] + [child]
            elif colour[child] == WHITE:
                colour[child] = GREY
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def _layer(module: str) -> int | None:
    """The index in LAYERS of the module's top-level name, or None when it is in no layer."""
    top = module.removeprefix(PACKAGE).removeprefix(".").split(".")[0]
    return next((i for i, names in enumerate(LAYERS) if top in names), None)


def _comments(path: Path) -> set[int]:
    """Line numbers that hold a comment."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return {t.start[0] for t in tokens if t.type == tokenize.COMMENT}


def test_the_import_graph_read_from_the_source_is_complete():
    """The graph the other tests read: every module parses, and known edges are found (relative and absolute)."""
    edges = {(i.importer, i.target) for i in imports()}
    assert {"qsparse_jax.nn.model", "qsparse_jax.train.loop", "qsparse_jax.cli"} <= modules().keys()
    assert ("qsparse_jax.train.methods", "qsparse_jax.train.methods.ast") in edges  # from .ast import ...
    assert ("qsparse_jax.train.methods", "qsparse_jax.config") in edges  # from ...config import Config
    assert ("qsparse_jax.cli", "?") in edges  # importlib.import_module(f".{module}", __name__)


def test_the_cycle_finder_names_a_cycle_and_passes_a_chain():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    graph = {m: set() for m in modules()}
    for i in static_imports():
        if i.target != i.importer:
            graph[i.importer].add(i.target)
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_each_module_imports_only_from_its_own_layer_or_those_below():
    order = " -> ".join("/".join(sorted(n or "qsparse_jax/__init__" for n in names)) for names in LAYERS)
    bad = [f"{m}: in no layer" for m in modules() if _layer(m) is None]
    bad += [i.where() for i in static_imports()
            if None not in (_layer(i.target), _layer(i.importer)) and _layer(i.target) > _layer(i.importer)]
    assert not bad, (f"modules in no layer or importing from a higher one (order, bottom to top: {order}):\n"
                     + "\n".join(bad))


def test_function_local_imports_of_the_package_are_few_and_each_says_why():
    local = [i for i in imports() if i.local]
    uncommented = []
    for i in local:
        comments = _comments(i.path)
        if not comments & set(range(i.lineno - 1, i.end_lineno + 1)):
            uncommented.append(i.where())
    assert len(local) <= MAX_LOCAL_IMPORTS, (f"{len(local)} function-local imports of the package's own modules "
                                            f"(at most {MAX_LOCAL_IMPORTS}):\n" + "\n".join(i.where() for i in local))
    assert not uncommented, ("function-local imports without a comment on their line or the line above saying "
                             "why:\n" + "\n".join(uncommented))


def test_no_module_over_600_lines():
    long = {str(p.relative_to(SRC.parent)): n for p in modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_module_docstring_opens_with_its_one_job():
    bad = {}
    for name, tree in trees().items():
        doc = ast.get_docstring(tree)
        first = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
        where = str(modules()[name].relative_to(SRC.parent))
        if not first:
            bad[where] = "no docstring"
        elif PLACEHOLDER.search(first):
            bad[where] = f"placeholder: {first!r}"
        elif len(first.split()) < 3:
            bad[where] = f"does not state a job: {first!r}"
    assert not bad, "module docstrings:\n" + "\n".join(f"{k}: {v}" for k, v in sorted(bad.items()))
