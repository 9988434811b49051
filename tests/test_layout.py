"""The layout rules of docs/architecture.md, checked on the source (no imports run).

- No import cycles anywhere in modules/ (lazy imports inside functions count too).
- The flat modules/*.py files are the A1111 facade: thin, each saying which A1111 module it stands
  for; nothing in the layer packages imports them. services.py is the one composition helper.
- Only the UI and the extension host (whose Script API builds components) import gradio.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from conftest import ROOT

MODULES = ROOT / "modules"
COMPOSITION = {"services"}          # flat, but not facade: builds the objects webui.py wires
GRADIO_PACKAGES = {"ui", "extensions"}
FACADE_MAX_LINES = 60
FACADE_MAX_FUNCTION_LINES = 15


def _name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _sources() -> dict[str, tuple[Path, ast.Module]]:
    return {_name(p): (p, ast.parse(p.read_text(encoding="utf-8"))) for p in MODULES.rglob("*.py")}


def _imports(tree: ast.Module, known: set[str]) -> set[str]:
    """Every modules.* module a file imports, at any depth (`from pkg import sub` names pkg.sub)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("modules"))
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("modules"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
    return out


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {name: {t for t in _imports(tree, known) if t in known and t != name} for name, (_, tree) in sources.items()}


def _facades() -> list[Path]:
    return sorted(p for p in MODULES.glob("*.py") if p.stem not in COMPOSITION | {"__init__"})


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_in_modules():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layer_packages_never_import_the_facade():
    facade_names = {_name(p) for p in _facades()} | {"modules.extensions"}  # the package's A1111 names
    offenders = []
    for name, targets in _graph().items():
        if name.count(".") >= 2 or name == "modules.extensions":  # inside a layer package
            offenders += [f"{name} imports {t}" for t in sorted(targets & facade_names)]
    assert offenders == []


def test_only_ui_and_extension_host_import_gradio():
    offenders = []
    for name, (path, tree) in _sources().items():
        parts = name.split(".")
        if len(parts) < 3 or parts[1] in GRADIO_PACKAGES:
            continue
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{name} imports {m}" for m in mods if m.split(".")[0] == "gradio"]
    assert offenders == []


def test_facade_modules_are_thin_and_say_what_they_stand_for():
    problems = []
    for path in _facades():
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        doc = ast.get_docstring(tree) or ""
        if not doc.startswith("A1111's ``modules."):
            problems.append(f"{path.name}: docstring must start with A1111's ``modules.<name>``")
        if len(text.splitlines()) > FACADE_MAX_LINES:
            problems.append(f"{path.name}: {len(text.splitlines())} lines (a facade re-exports or adapts)")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > FACADE_MAX_FUNCTION_LINES:
                    problems.append(f"{path.name}: {node.name} is {length} lines")
    assert problems == []


def test_modules_top_level_is_the_facade_and_the_composition_helper():
    packages = sorted(p.name for p in MODULES.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert packages == ["api", "core", "engine", "extensions", "models", "ui"]
    for path in _facades():
        assert not (MODULES / path.stem).is_dir(), f"{path.name} shadows a package"


def test_the_rules_see_a_facade_import_from_a_package(tmp_path):
    tree = ast.parse("def f():\n    from modules import shared\n    from modules.core import options\n")
    assert _imports(tree, {"modules.shared", "modules.core.options"}) == {"modules.shared", "modules.core.options"}


def test_no_script_folder_shadows_the_standard_library():
    """`python bench/x.py` puts bench/ first on sys.path: a bench/queue.py broke torch's own `import queue`."""
    import sys

    for folder in ("bench", "tools", "tests"):
        names = {p.stem for p in (ROOT / folder).glob("*.py")}
        assert names & set(sys.stdlib_module_names) == set(), folder
