"""No import cycle in ``plugins/``: every import counts, at module level or inside a function.

The graph is read from the source (``ast``), so a cycle hidden behind a lazy import, which Python
would only meet at the call, fails here too.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Each module of ``root`` -> the modules of ``root`` it imports (``from a import b``: ``a.b`` if that is a module, else ``a``)."""
    modules = {module_name(root, path): path for path in root.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        return list(err.args[1])
    return None


def test_plugins_have_no_import_cycle() -> None:
    graph = import_graph(PLUGINS)
    assert len(graph) > 40, sorted(graph)  # the whole package was read
    found = cycle(graph)
    assert found is None, f"import cycle: {' -> '.join(found or [])}"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # a cycle through an import inside a function, as the one between sharding and the run loop was
        (
            {"pkg/__init__.py": "", "pkg/a.py": "from pkg.b import x\n", "pkg/b.py": "def f():\n    from pkg import a\n"},
            {"pkg.a", "pkg.b"},
        ),
        ({"pkg/__init__.py": "", "pkg/a.py": "from . import b\n", "pkg/b.py": "from .a import y\n"}, {"pkg.a", "pkg.b"}),
        ({"pkg/__init__.py": "", "pkg/a.py": "from pkg.b import x\n", "pkg/b.py": "import json\n"}, None),
    ],
)
def test_the_check_finds_a_cycle(tmp_path: Path, files: dict[str, str], expected: set[str] | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = cycle(import_graph(tmp_path))
    assert (set(found) if found else None) == expected
