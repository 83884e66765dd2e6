"""The package's dependencies point one way: backbone <- model <- deploy / tools <- command line, with no cycles.

The import graph is read from the source (every ``import`` statement, also the
ones inside functions), so a lazy import that would close a cycle counts too;
imports for annotations only (under ``if TYPE_CHECKING:``) never run and do not count.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "anomalib_contnet"

LAYERS: dict[str, int] = {
    "atomic_files": 0,
    "checkpoints": 0,
    "warning_filters": 0,
    "backbones": 1,
    "models": 2,
    "deploy": 3,
    "data": 3,
    "pretrained": 3,
    "evaluation": 4,
    "demo": 5,
    "registration": 3,
    "cli": 6,
}
"""Rank of each top-level part of the package: a module may import only parts of its own rank or lower."""

TOOLS = ("data", "deploy", "demo", "evaluation", "pretrained", "cli")
"""Parts that a plugin user (``import anomalib_contnet``, anomalib's own CLI) never loads."""


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE_ROOT.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    found: list[ast.AST] = []
    pending = [tree]
    while pending:
        node = pending.pop()
        found.append(node)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            pending.extend(node.orelse)
        else:
            pending.extend(ast.iter_child_nodes(node))
    return found


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Modules of this package (among ``modules``) that ``path`` imports anywhere in its body."""
    names: set[str] = set()
    for node in runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            names.update(submodules or {node.module})  # ``from package import submodule`` needs the submodule
    return names & modules


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE_ROOT.rglob("*.py")}
    return {name: imported_modules(path, set(paths)) for name, path in paths.items()}


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def test_every_part_of_the_package_has_a_rank() -> None:
    parts = {part(module) for module in import_graph()} - {"__init__"}
    assert parts == set(LAYERS)


def test_no_part_imports_a_part_above_it() -> None:
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        if part(module) != "__init__"
        for target in targets
        if part(target) != "__init__" and LAYERS[part(target)] > LAYERS[part(module)]
    )
    assert upward == []


def test_there_are_no_import_cycles() -> None:
    graph = import_graph()
    cycles: list[list[str]] = []
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append([*trail[trail.index(target) :], target])
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_importing_the_plugin_loads_none_of_the_tools() -> None:
    """``import anomalib_contnet`` (what anomalib's autoload hook does) loads the backbone, model and registration."""
    probe = (
        "import sys, anomalib_contnet; "
        "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('anomalib_contnet.')}))"
    )
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    loaded = set(ast.literal_eval(completed.stdout.strip().splitlines()[-1]))
    assert loaded, "the probe saw no anomalib_contnet modules at all"
    assert not loaded & set(TOOLS), f"importing the plugin loaded tool modules: {sorted(loaded & set(TOOLS))}"
