"""The package's layering: no import cycle between its modules, shared types and the config schema
at the bottom, registries that other packages extend through entry points."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "semiseg"


# ----------------------------------------------------------------------------------------------
# Import graph
# ----------------------------------------------------------------------------------------------


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return "TYPE_CHECKING" in ast.unparse(test)


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports executed when the module is imported: its body, class bodies and if/try blocks, but
    not function bodies and not ``if TYPE_CHECKING:`` blocks."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse)
            else:
                for name in ("body", "orelse", "finalbody", "handlers"):
                    block = getattr(node, name, None)
                    if isinstance(block, list):
                        visit(block)

    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports at module level. Importing ``a.b.c`` also runs
    ``a`` and ``a.b`` (their ``__init__``), so those count too, except the importer's own packages."""
    modules = _module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        targets: set[str] = set()
        for node in _module_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                bases = [alias.name for alias in node.names]
                candidates = list(bases)
            else:
                if node.level:
                    anchor = here[: len(here) - (node.level - 1)]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                else:
                    base = node.module or ""
                candidates = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            for target in candidates:
                if target not in modules or target == name:
                    continue
                targets.add(target)
                parts = target.split(".")
                for i in range(1, len(parts)):  # parent packages run first
                    parent = ".".join(parts[:i])
                    if parent in modules and not name.startswith(parent + ".") and parent != name:
                        targets.add(parent)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and "semiseg.experiment.grid" in graph
    assert {"semiseg.methods", "semiseg.inference", "semiseg.types"} <= graph["semiseg.trainer"]
    assert "semiseg.data" in graph["semiseg.trainer"]  # importing data.base runs data/__init__ first
    assert "semiseg.trainer" not in graph["semiseg.cli"]  # a function-level import (start-up stays light)
    assert "semiseg.methods.base" not in graph["semiseg.inference"]  # under `if TYPE_CHECKING:`
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_bottom_layers_import_nothing_above_them():
    graph = import_graph()
    assert graph["semiseg.types"] == set()  # torch and the standard library only
    assert graph["semiseg.registry"] == {"semiseg.errors"}
    assert graph["semiseg.config_hashing"] == set()
    assert graph["semiseg.config_schema"] == {"semiseg.registry"}
    assert graph["semiseg.config_load"] == {
        "semiseg.config_hashing",  # the frozen flat model defaults a saved config is read with
        "semiseg.config_schema",
        "semiseg.errors",
        "semiseg.registry",
    }
    # the facade that re-exports the three
    assert graph["semiseg.config"] == {
        "semiseg.config_hashing",
        "semiseg.config_load",
        "semiseg.config_schema",
    }


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_importing_the_config_imports_no_method_plugin_or_model():
    code = (
        "import sys\n"
        "import semiseg.config\n"
        "heavy = ('torch', 'semiseg.methods', 'semiseg.plugins', 'semiseg.models', 'semiseg.mixers',\n"
        "         'semiseg.pseudo_labels', 'semiseg.data', 'semiseg.trainer')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(heavy))\n"
        "assert not loaded, loaded\n"
        "from semiseg.registry import METHODS, MODELS, PLUGINS\n"
        "assert {'supervised', 'unimatch'} <= set(METHODS) and 'sufd' in PLUGINS and 'unet' in MODELS\n"
        "assert not any(m.startswith(heavy) for m in sys.modules)\n"
        "print('ok')\n"
    )
    done = run_python(code)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_semiseg_list_imports_no_torch():
    code = (
        "import sys\n"
        "import semiseg\n"
        "names = semiseg.registered()\n"
        "assert 'supmix' in names['mixers'] and 'freematch' in names['pseudo_label_masks']\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print('ok')\n"
    )
    done = run_python(code)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize(
    "module",
    [
        "semiseg.types",
        "semiseg.registry",
        "semiseg.config",
        "semiseg.config_hashing",
        "semiseg.config_schema",
        "semiseg.config_load",
        "semiseg.inference",
        "semiseg.experiment.locks",
        "semiseg.experiment.report",
        "semiseg.mixers",
        "semiseg.pseudo_labels",
        "semiseg.data.datasets",
    ],
)
def test_modules_import_first_in_a_fresh_interpreter(module):
    done = run_python(f"import {module}")
    assert done.returncode == 0, done.stderr[-2000:]
