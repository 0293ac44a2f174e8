"""The package's import rules, read from the source (no module is imported):

* ``core/`` (algorithms and the backend seam) imports none of comfy, the CLI, the evaluation
  harness or the fixture;
* there is no import cycle between the package's modules, counting imports inside functions too;
* every benchmark imports the package by one root (``emergent_seg``).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "emergent_seg"
SKIP_DIRS = {"tests", "web", "docs", "example_workflows", "benchmarks", ".git", ".ci", "node_modules"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def package_modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in SKIP_DIRS or any(p.startswith(".") for p in rel.parts):
            continue
        out[module_name(path)] = path
    return out


def imported_names(path: Path, name: str) -> set[str]:
    """Absolute names of everything ``path`` imports, anywhere in the file."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                root = base[: len(base) - (node.level - 1)]
                mod = ".".join(root + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target in imported_names(path, name):
            # "pkg.mod.attr" -> the longest prefix that is one of our modules
            parts = target.split(".")
            for cut in range(len(parts), 0, -1):
                candidate = ".".join(parts[:cut])
                if candidate in modules:
                    if candidate != name and not name.startswith(candidate + "."):
                        edges.add(candidate)
                    break
        graph[name] = edges
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
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_core_imports_no_host_cli_evaluation_or_fixture():
    forbidden = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", f"{PACKAGE}.cli",
                 f"{PACKAGE}.evaluation", f"{PACKAGE}.fixture", f"{PACKAGE}.nodes", f"{PACKAGE}.progress")
    bad = []
    for name, path in package_modules().items():
        if not name.startswith(f"{PACKAGE}.core"):
            continue
        for target in imported_names(path, name):
            if any(target == f or target.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not bad, "\n".join(bad)


def test_core_does_not_print_or_parse_arguments():
    bad = []
    for name, path in package_modules().items():
        if not name.startswith(f"{PACKAGE}.core"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} print")
        if "argparse" in imported_names(path, name):
            bad.append(f"{path.relative_to(ROOT)} imports argparse")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = import_graph()
    assert f"{PACKAGE}.core.settings" in graph and graph[f"{PACKAGE}.cli"]  # the walk saw the tree
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_catches_a_cycle():
    graph = import_graph()
    graph[f"{PACKAGE}.core.settings"] = graph[f"{PACKAGE}.core.settings"] | {f"{PACKAGE}.core.pipeline"}
    assert find_cycle(graph) is not None            # pipeline -> settings -> pipeline
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_relative_imports_resolve_against_the_package():
    path = ROOT / "evaluation" / "cli.py"
    names = imported_names(path, module_name(path))
    assert f"{PACKAGE}.core.settings" in names and f"{PACKAGE}.progress" in names


@pytest.mark.parametrize("script", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_benchmarks_import_the_package_by_one_root(script):
    tree = ast.parse(script.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
    assert "core" not in roots and "fixture" not in roots and "nodes" not in roots, roots
    assert "sys" not in roots or "sys.path" not in script.read_text(), "benchmarks must not patch sys.path"


def test_every_document_cited_in_code_exists():
    import re

    cited = re.compile(r"(?<![\w/.-])((?:docs/)?[A-Z][A-Z_]+\.md|[a-z_]+/[\w/.-]+\.md)\b")
    missing = []
    for path in [*package_modules().values(), *sorted((ROOT / "benchmarks").glob("*.py"))]:
        for name in cited.findall(path.read_text()):
            base = path.parent if not name.startswith("docs/") and "/" not in name else ROOT
            if not (base / name).exists() and not (ROOT / name).exists():
                missing.append(f"{path.relative_to(ROOT)} cites {name}")
    assert not missing, "\n".join(missing)
