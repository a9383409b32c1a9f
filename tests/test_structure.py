"""The package's shape: no import circles, and lower layers never import higher ones.

Imports inside functions count (they used to hide circles); ``TYPE_CHECKING`` blocks don't,
since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lmscli

ROOT = Path(lmscli.__file__).parent
LOWER = ("catalog", "engine", "prompting", "logbus")
HIGHER = ("server", "client", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path, modules: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", 0) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in modules and m != me}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    names = set(files)
    return {name: imports_of(path, names) for name, path in files.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            # a package's __init__ re-exporting its own modules is not a circle
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_circle() -> None:
    assert find_cycle(graph()) is None, " → ".join(find_cycle(graph()) or [])


def test_lower_layers_never_import_higher_ones() -> None:
    wrong = [f"{src} imports {dst}" for src, dsts in graph().items() for dst in dsts
             if src.split(".")[1:2] and src.split(".")[1] in LOWER
             and dst.split(".")[1:2] and dst.split(".")[1] in HIGHER]
    assert not wrong, wrong


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def private_uses(path: Path) -> list[str]:
    """``x._name`` where ``_name`` is not an attribute this module's own classes set: a
    module reaching into another's insides."""
    tree = ast.parse(path.read_text())
    private = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute)
               and n.attr.startswith("_") and not n.attr.startswith("__")]
    own = {n.attr for n in private
           if isinstance(n.value, ast.Name) and n.value.id in ("self", "cls")}
    found = []
    for node in private:
        if node.attr in own:
            continue
        found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {ast.unparse(node)}")
    return found


def test_no_private_attribute_used_from_outside() -> None:
    wrong = [use for path in sorted(ROOT.rglob("*.py")) for use in private_uses(path)]
    assert not wrong, wrong


def calls_of(path: Path, names: set[str]) -> list[str]:
    """Where ``path`` calls one of ``names`` (as ``name(...)`` or ``x.name(...)``)."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else \
            func.attr if isinstance(func, ast.Attribute) else None
        if name in names:
            found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {name}")
    return found


def test_only_the_pipeline_prepares_and_submits_local_predictions() -> None:
    """One place builds prompts and starts predictions, so every API gets the same prompt,
    grammar, tool use and events (server/pipeline/local.py; running.py is its engine
    bridge)."""
    allowed = {"lmscli/server/pipeline/local.py", "lmscli/server/pipeline/running.py",
               "lmscli/server/pipeline/tooluse.py"}  # where chat_prompt is defined
    server = ROOT / "server"
    wrong = [call for path in sorted(server.rglob("*.py"))
             if str(path.relative_to(ROOT.parent)) not in allowed
             for call in calls_of(path, {"chat_prompt", "Running", "submit", "render_chat",
                                         "check_grammar"})]
    assert not wrong, wrong


def private_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [f"{path.relative_to(ROOT.parent)}:{node.lineno} {alias.name}"
            for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            for alias in node.names
            if alias.name.startswith("_") and not alias.name.startswith("__")]


def test_no_module_imports_private_names() -> None:
    wrong = [use for path in sorted(ROOT.rglob("*.py")) for use in private_imports(path)]
    assert not wrong, wrong


def test_routes_are_listed_in_app_py_alone() -> None:
    """One route table: a handler that serves local and linked models branches itself
    (``Linked.target``), instead of a second table that wraps it by path."""
    app = ROOT / "server" / "app.py"
    wrong = [call for path in sorted(ROOT.rglob("*.py")) if path != app
             for call in calls_of(path, {"Route", "WebSocketRoute", "Mount"})]
    assert not wrong, wrong


def test_no_two_classes_share_a_name() -> None:
    """A class name says which one it is: a reader who searches for it finds one."""
    seen: dict[str, str] = {}
    twice = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                where = str(path.relative_to(ROOT.parent))
                if node.name in seen:
                    twice.append(f"{node.name}: {seen[node.name]} and {where}")
                seen.setdefault(node.name, where)
    assert not twice, twice


def test_server_folders_say_what_lives_there() -> None:
    """The pipeline, the API surfaces, linked engines and the SDK protocol each have a folder;
    what is left at the top is what they all share (app, state, errors, streams, models)."""
    server = ROOT / "server"
    top = sorted(p.name for p in server.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "app.py", "body.py", "errors.py",
                   "logs_http.py", "models.py", "run.py", "security.py", "state.py",
                   "streams.py"]
    assert {p.name for p in server.iterdir() if p.is_dir() and p.name != "__pycache__"} == \
        {"pipeline", "apis", "links", "sdk"}
