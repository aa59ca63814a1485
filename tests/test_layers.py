"""The package's layers: no import cycle (imports inside functions count too: a lazy import that closes a cycle is
still one), and the configuration layer imports no torch, so checking a spec or a run folder stays light."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "evomerge"
# modules that read specs, recipes and run folders: they must not pull in torch or the merge stack
TORCH_FREE = ["errors", "scores", "yaml_io", "interrupt", "refs", "files", "layout", "registry", "recipes", "params",
              "spec", "run", "status", "report", "events", "executors",
              "virtual_clock"]
MERGE_STACK = ["torch", "evomerge.checkpoint", "evomerge.kernels", "evomerge.merge", "evomerge.lora",
               "evomerge.vocab", "evomerge.dataflow"]


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """The nodes under ``if TYPE_CHECKING:`` (imports for annotations only, never run)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    return skipped


def _imported_modules(node: ast.AST, modules: set[str]) -> set[str]:
    """The package's modules one import statement names (``from evomerge import x`` names module ``x``)."""
    if isinstance(node, ast.Import):
        return {a.name.split(".")[1] for a in node.names if a.name.startswith("evomerge.")} & modules
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level == 0 and node.module and node.module.startswith("evomerge"):
        parts = node.module.split(".")
        return ({parts[1]} if len(parts) > 1 else {a.name for a in node.names}) & modules
    if node.level == 1:
        return ({node.module.split(".")[0]} if node.module else {a.name for a in node.names}) & modules
    return set()


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its body (function-level imports included)."""
    packages = {p.name for p in package.iterdir() if (p / "__init__.py").exists()}
    modules = {p.stem for p in package.glob("*.py")} | packages
    graph = {}
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        skipped = _type_checking_nodes(tree)
        graph[path.stem] = {m for node in ast.walk(tree) if id(node) not in skipped
                            for m in _imported_modules(node, modules)} - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search, marking modules on the current path)."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        for target in sorted(graph.get(module, ())):
            cycle = visit(target, [*path, module])
            if cycle:
                return cycle
        done.add(module)
        return None

    return next((c for m in sorted(graph) if (c := visit(m, []))), None)


def test_find_cycle_sees_a_cycle_closed_by_a_function_level_import(tmp_path):
    (tmp_path / "a.py").write_text("from evomerge.b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from evomerge import c\n")
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from evomerge import b\n"
                                   "def g():\n    from . import a\n")
    (tmp_path / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from evomerge import a\n")
    graph = import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert {"spec", "refs", "registry", "kernels", "launch", "models"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("module", TORCH_FREE)
def test_the_config_layer_imports_no_torch(module):
    code = (f"import sys, evomerge.{module}; "
            f"print(' '.join(m for m in {MERGE_STACK!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE.parent).stdout.split()
    assert loaded == [], f"import evomerge.{module} loads {', '.join(loaded)}"


@pytest.mark.slow
def test_the_registry_loads_a_kernel_on_first_use():
    code = ("import sys\nfrom evomerge.registry import get_method\nm = get_method('ties')\n"
            "assert 'evomerge.kernels' not in sys.modules and m.parameters['density'].high == 1.0\n"
            "import evomerge.kernels as k\nassert m.fn is k.ties and get_method('slerp').fn is k.slerp\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
