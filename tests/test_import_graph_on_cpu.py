"""The package's import graph stays layered: no module imports itself back through others (function-level imports
count, ``TYPE_CHECKING`` blocks do not), no package imports itself back through others (the config root composing
the stage configs aside), evaluation and review do not import each other (``medrl.report`` sits above both), the
reward plane never reaches up into evaluation or PPO, production code never imports the test server package, and a
module whose docstring says it has no Ray does not load Ray."""
from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "medrl"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    return {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for stmt in node.body for n in ast.walk(stmt)}


def _imported(node: ast.AST, package: str, modules: dict[str, Path]) -> list[str]:
    """The medrl modules an import statement loads (``from a.b import c``: ``a.b.c`` when that is a module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    else:
        return []
    out = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name.startswith("medrl."):
            out.append(name)
    return out


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """module -> the medrl modules it imports at run time, at any level of the file (read once per session)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        skip = _type_checking_nodes(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {target for node in ast.walk(tree) if id(node) not in skip
                       for target in _imported(node, package, modules) if target != name}
    return graph


def package_of(module: str) -> str:
    """``medrl.ppo.driver`` -> ``medrl.ppo``; a top-level module is its own package (``medrl.config``)."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Package -> the packages it imports. The one allowed way back: the config root (``medrl.config``) composes each
    stage's ``<package>.config`` module, which imports nothing of its package but other config modules."""
    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        for target in targets:
            if package_of(module) == package_of(target) or (module == "medrl.config" and target.endswith(".config")):
                continue
            out.setdefault(package_of(module), set()).add(package_of(target))
    return out


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (each node imports the next, the first is the last), or None."""
    try:
        tuple(TopologicalSorter(graph).static_order())  # imports as predecessors: an importer comes after them
    except CycleError as err:
        return err.args[1][::-1]
    return None


def loads(graph: dict[str, set[str]], module: str) -> set[str]:
    """Every module that importing ``module`` loads (transitively)."""
    seen, todo = set(), [module]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_graph_reader_finds_what_it_must():
    """The reader itself: function-level and relative imports count, TYPE_CHECKING does not, and a cycle is found."""
    graph = import_graph()
    assert "medrl.ppo.driver" in graph["medrl.cli"]  # imported inside a function
    assert "medrl.ray_utils" in graph["medrl.ppo.driver"]  # imported inside run_ppo
    assert "medrl.consult.engine" not in graph["medrl.consult.dialogue"]  # only under TYPE_CHECKING
    relative = ast.parse("from .batch import Batch\nfrom ..models import chat").body
    assert [_imported(node, "medrl.ppo", _modules()) for node in relative] == [["medrl.ppo.batch"],
                                                                                ["medrl.models.chat"]]
    found = cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})  # a imports b imports c imports a
    assert found is not None and found[0] == found[-1] and "".join(found[:-1]) in ("abc", "bca", "cab")
    assert cycle({"a": {"b"}, "b": set()}) is None
    stage_configs = [m for m in graph if m.endswith(".config") and m != "medrl.config"]
    assert len(stage_configs) >= 6
    for module in stage_configs:  # what makes the config root's arrows into the stages harmless
        assert "medrl.config" not in loads(graph, module), module


def test_no_module_and_no_package_imports_itself_back():
    graph = import_graph()
    assert cycle(graph) is None, f"module import cycle: {' imports '.join(cycle(graph))}"
    packages = package_graph(graph)
    assert cycle(packages) is None, f"package import cycle: {' imports '.join(cycle(packages))}"


@pytest.mark.parametrize("importer, imported", [
    ("medrl.evaluation", "medrl.review"), ("medrl.review", "medrl.evaluation"),
    ("medrl.reward", "medrl.evaluation"), ("medrl.reward", "medrl.ppo"), ("medrl.reward", "medrl.report"),
    ("medrl.data", "medrl.reward"), ("medrl.models", "medrl.ppo"),
])
def test_layers_do_not_reach_across(importer, imported):
    packages = package_graph(import_graph())
    assert imported not in packages.get(importer, set()), f"{importer} imports {imported}"


def test_production_code_never_imports_the_test_servers():
    graph = import_graph()
    users = sorted(m for m, targets in graph.items() if not m.startswith("medrl.testing")
                   for t in targets if t.startswith("medrl.testing"))
    assert users == []


def test_modules_that_say_they_have_no_ray_load_no_ray():
    """Pure cores say so in their docstring ("no Ray"): neither they nor anything they import loads ``ray``."""
    pure = []
    for name, path in _modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if re.search(r"\b[Nn]o Ray\b", doc):
            pure.append(name)
    assert {"medrl.ppo.learner", "medrl.ppo.algos", "medrl.reward.scoring", "medrl.consult.dialogue"} <= set(pure)
    code = ("import importlib, sys\n"
            f"for m in {pure!r}:\n"
            "    importlib.import_module(m)\n"
            "    assert 'ray' not in sys.modules, m + ' loads ray'\n"
            "print('ok', len(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]
