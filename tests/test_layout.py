"""The house: no import cycles between the package's modules; run data read through the Run's API."""

import ast
from pathlib import Path

import clip_interpret

ROOT = Path(clip_interpret.__file__).parent


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (top level or inside functions)."""
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                found = subs if node.module is None and subs else [target, *subs]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {m for m in found if m in mods and m != name}
    return graph


def _cycles(graph) -> list[list[str]]:
    seen, cycles = set(), []

    def visit(node, path):
        if node in path:
            cycles.append(path[path.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])

    for node in sorted(graph):
        visit(node, [])
    return cycles


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert "clip_interpret.cli.common" in graph and graph["clip_interpret.cli.runs"]  # the scan sees the package
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_run_internals_are_read_only_by_the_run():
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                 if p.name != "store.py" and "._pieces" in p.read_text()]
    assert offenders == []


def test_every_module_opens_with_what_it_is_for():
    missing = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
               if p.name != "__main__.py" and not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []
