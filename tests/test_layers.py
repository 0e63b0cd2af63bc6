"""The package's imports point one way: no module imports, even inside a function or for type checking only, a module
that imports it back (docs/architecture.md)."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pneumolab

PACKAGE = Path(pneumolab.__file__).parent


def _module_name(file: Path) -> str:
    parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(file: Path, name: str, known: set[str]) -> set[str]:
    """Every pneumolab module `file` imports, at any depth of its syntax tree (functions, TYPE_CHECKING blocks)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the file's package upwards
                base = name if file.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = f"{base}.{module}" if module else base
            targets = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from pneumolab.x import name`: the module is pneumolab.x
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(f): f for f in PACKAGE.rglob("*.py")}
    return {name: _imports(file, name, set(files)) for name, file in files.items()}


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert len(graph) > 50 and "pneumolab.inference.steps" in graph["pneumolab.inference.pytorch"]
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        raise AssertionError(f"import circle: {' -> '.join(error.args[1])}") from None


def test_inference_modules_import_in_one_direction():
    order = ["card", "steps", "pytorch", "files", "explain", "export", "onnx", "ensemble", "loader"]
    graph = import_graph()
    for position, module in enumerate(order):
        later = {f"pneumolab.inference.{m}" for m in order[position + 1 :]}
        assert not graph[f"pneumolab.inference.{module}"] & later, module
    # the layers below inference never reach up into it
    for low in ("pneumolab.data", "pneumolab.models", "pneumolab.train", "pneumolab.gate", "pneumolab.config"):
        for name, imported in graph.items():
            if name == low or name.startswith(low + "."):
                assert not {m for m in imported if m.startswith("pneumolab.inference")}, name
