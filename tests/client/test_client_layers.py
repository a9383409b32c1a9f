"""The client modules form layers: each imports the modules below it at its top, plainly.

An import between client modules under ``if TYPE_CHECKING:`` or inside a function body is
how client.py, handles.py and act.py once hid an import circle from each other, so both are
refused here, and so is a circle among the modules' imports, hidden ones included.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmscli
from tests.test_structure import find_cycle

PACKAGE = "lmscli.client"
ROOT = Path(lmscli.__file__).parent / "client"
# The package's __init__ loads each exported name from its module on first use, and names
# them under TYPE_CHECKING for type checkers only. That hides no circle as long as no client
# module imports the package itself: its edges stay in the circle check, which would see one.
FACADE = PACKAGE
DYNAMIC_IMPORTS = ("import_module", "__import__")


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    hidden_in: str | None  # where a runtime import would not see it; None: the module's top

    def __str__(self) -> str:
        return f"{self.source}:{self.line} imports {self.target} in {self.hidden_in}"


def module_name(path: Path) -> str:
    return PACKAGE if path.name == "__init__.py" else f"{PACKAGE}.{path.stem}"


def client_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.glob("*.py"))}


def _mentions_type_checking(test: ast.expr) -> bool:
    return any(isinstance(n, ast.Name | ast.Attribute)
               and (n.id if isinstance(n, ast.Name) else n.attr) == "TYPE_CHECKING"
               for n in ast.walk(test))


def _targets(node: ast.Import | ast.ImportFrom, me: str, known: set[str]) -> Iterator[str]:
    """The client modules an import statement loads, its relative form resolved."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = me if me == PACKAGE else me.rpartition(".")[0]
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
        # ``from lmscli.client import handles`` loads the module handles, not a name
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                 for a in node.names]
    resolved: dict[str, None] = {}  # in order, once each
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != me:
            resolved[name] = None
    yield from resolved


def imports_in(source: str, me: str, known: set[str]) -> list[Import]:
    """Every import of a client module in ``source``, with where it hides if it does."""
    found: list[Import] = []

    def visit(node: ast.AST, hidden_in: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = hidden_in
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                inner = hidden_in or "a function body"
            elif isinstance(child, ast.If) and _mentions_type_checking(child.test):
                inner = hidden_in or "an `if TYPE_CHECKING:` block"
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.extend(Import(me, t, child.lineno, hidden_in)
                             for t in _targets(child, me, known))
            elif (isinstance(child, ast.Call)
                  and ast.unparse(child.func).rpartition(".")[2] in DYNAMIC_IMPORTS):
                # its target is data, not a name this test can follow: always hidden
                found.append(Import(me, ast.unparse(child), child.lineno, "a dynamic import"))
            visit(child, inner)

    visit(ast.parse(source), None)
    return found


def all_imports() -> list[Import]:
    modules = client_modules()
    return [i for name, path in modules.items()
            for i in imports_in(path.read_text(), name, set(modules))]


def import_graph(imports: list[Import]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in client_modules()}
    for i in imports:
        if i.target in graph:
            graph[i.source].add(i.target)
    return graph


def test_client_modules_import_each_other_only_at_the_top() -> None:
    hidden = [str(i) for i in all_imports() if i.hidden_in and i.source != FACADE]
    assert not hidden, "\n".join(hidden)


def test_client_modules_import_no_circle() -> None:
    graph = import_graph(all_imports())
    # the parsing found the imports at all: an empty graph has no circle either
    assert "lmscli.client.handles" in graph["lmscli.client.client"]
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph) or [])


def test_the_checks_see_hidden_imports_and_circles() -> None:
    known = {PACKAGE, "lmscli.client.a", "lmscli.client.b"}
    source = ("from typing import TYPE_CHECKING\n"
              "import lmscli.client.b\n"
              "if TYPE_CHECKING:\n    from lmscli.client.b import B\n"
              "def f() -> None:\n    from . import b\n"
              "class C:\n    async def g(self) -> None:\n        from .b import B\n"
              "def h() -> None:\n    importlib.import_module('lmscli.client.b')\n"
              "from lmscli.client import Chat\n")
    found = [(i.target, i.hidden_in) for i in imports_in(source, "lmscli.client.a", known)]
    assert found == [
        ("lmscli.client.b", None),
        ("lmscli.client.b", "an `if TYPE_CHECKING:` block"),
        ("lmscli.client.b", "a function body"),
        ("lmscli.client.b", "a function body"),
        ("importlib.import_module('lmscli.client.b')", "a dynamic import"),
        (PACKAGE, None),
    ]
