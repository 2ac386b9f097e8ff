"""The import graph of src/rethink_tl, read statically (every ``import`` and ``from ... import``, function-level
ones included): no circles, and data flows one way (README, "Code layout").

    cli -> commands (train, pretrain, advise, inference, evidence's report) -> the machinery (engine, rundir,
    distributed, models, weights, data, evidence.results, metrics, preempt, atomic_io) -> config, identity -> errors
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "rethink_tl"

# Lower layers never import higher ones; within a layer, imports must not form a circle.
LAYERS = [
    ("errors",),
    ("config", "identity", "runfiles"),
    ("atomic_io", "metrics", "preempt", "rundir", "distributed", "engine", "conf", "models", "data",
     "weights", "evidence.results", "evidence.predictions", "evidence.stats", "tracking"),
    ("train", "pretrain", "advise", "sweeps", "inference", "bench", "evidence.compare", "evidence.designs", "evidence.report",
     "evidence.figures", "evidence.clinical", "evidence"),
    ("cli", "__main__"),
]
# Pairs that must never import each other, whatever the layers allow.
FORBIDDEN = [
    ("models", "data"), ("models", "engine"), ("models", "weights"), ("data", "models"), ("data", "engine"),
    ("data", "weights"), ("train", "pretrain"), ("pretrain", "train"),
    # evidence reads runs only through its results module (and the predictions files it names)
    *[(f"evidence.{m}", other) for m in ("compare", "designs", "report", "figures", "stats", "clinical")
      for other in ("train", "pretrain", "rundir", "engine", "models", "data", "weights", "inference")],
]
# config is the schema: it imports nothing of the project but its errors.
ONLY = {"config": {"errors"}, "identity": {"errors"}, "runfiles": set(), "errors": set()}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def imports_of(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every import of the project's own modules."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            names = [a.name for a in node.names]
            # ``from . import atomic_io``: each name may itself be a module
            out.append((target, names, node.lineno))
    return out


def resolve(target: str, names: list[str], known: dict[str, Path]) -> list[str]:
    """The project modules an import statement loads."""
    found = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
    return found or [target]


def short(name: str) -> str:
    return name.removeprefix(PACKAGE + ".") if name != PACKAGE else "__init__"


def group_of(name: str) -> str:
    """The LAYERS entry a module belongs to: the longest matching prefix (evidence.results, then evidence)."""
    s = short(name)
    candidates = [g for layer in LAYERS for g in layer if s == g or s.startswith(g + ".")]
    if s == "__init__":
        return "__init__"
    assert candidates, f"{s} is in no layer of tests/test_imports.py: place it"
    return max(candidates, key=len)


def layer_of(group: str) -> int:
    if group == "__init__":
        return -1
    return next(i for i, layer in enumerate(LAYERS) if group in layer)


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        edges[name] = set()
        for target, names, _ in imports_of(name, path):
            for mod in resolve(target, names, known):
                if mod != name and mod in known:
                    edges[name].add(mod)
    return edges


def test_every_module_has_a_layer():
    for name in modules():
        group_of(name)


def test_no_import_circles():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(short(m) for m in stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_imports_flow_one_way():
    bad = []
    for name, targets in graph().items():
        src = group_of(name)
        for target in targets:
            dst = group_of(target)
            if short(target) == "__init__" or src == "__init__":
                continue  # the package's own __init__ holds only the version
            if layer_of(dst) > layer_of(src):
                bad.append(f"{short(name)} (layer {layer_of(src)}) imports {short(target)} (layer {layer_of(dst)})")
            for a, b in FORBIDDEN:
                if (src == a or short(name).startswith(a + ".")) and (dst == b or short(target).startswith(b + ".")):
                    bad.append(f"{short(name)} must not import {short(target)}")
            if src in ONLY and dst not in ONLY[src]:
                bad.append(f"{short(name)} may import only {sorted(ONLY[src]) or 'nothing of the project'}, not "
                           f"{short(target)}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_nothing_imports_cli():
    users = [short(n) for n, targets in graph().items() if f"{PACKAGE}.cli" in targets]
    assert users == ["__main__"]  # python -m rethink_tl is rtl, and nothing else reaches into the command line


def test_no_private_name_is_imported_from_another_module():
    known = modules()
    bad = []
    for name, path in known.items():
        for target, names, line in imports_of(name, path):
            for n in names:
                dunder = n.startswith("__") and n.endswith("__")
                if n.startswith("_") and not dunder and f"{target}.{n}" not in known:
                    bad.append(f"{short(name)}:{line} imports {n} from {short(target)}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source, expected", [
    ("from .. import atomic_io\nfrom ..errors import UserError\nfrom .results import RunFacts\n",
     {"rethink_tl.atomic_io", "rethink_tl.errors", "rethink_tl.evidence.results"}),
    ("def f():\n    from ..train import run\n", {"rethink_tl.train"}),
])
def test_the_reader_sees_relative_and_function_level_imports(tmp_path, source, expected):
    pkg = tmp_path / PACKAGE / "evidence"
    pkg.mkdir(parents=True)
    path = pkg / "probe.py"
    path.write_text(source)
    known = {**modules(), "rethink_tl.evidence.probe": path}
    found = {m for t, n, _ in imports_of("rethink_tl.evidence.probe", path) for m in resolve(t, n, known)}
    assert found == expected
