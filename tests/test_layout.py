"""The house: no import cycles between the package's modules or its packages, no private name
imported across modules, run data read through the Run's API."""

import ast
from pathlib import Path

import clip_interpret

ROOT = Path(clip_interpret.__file__).parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports(name: str, path: Path, mods) -> list[tuple[ast.AST, str, list]]:
    """(node, target module, [(imported name, bound name, module it names or None)]) of every import
    of a package module in one file, top level or inside functions."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names = [(a.name, a.asname or a.name, f"{target}.{a.name}" if f"{target}.{a.name}" in mods else None)
                     for a in node.names]
            out.append((node, target, names))
        elif isinstance(node, ast.Import):
            for a in node.names:
                out.append((node, a.name, [(a.name, a.asname or a.name.split(".")[0], a.name if a.asname else None)]))
    return [(node, target, names) for node, target, names in out
            if target in mods or any(module for _, _, module in names)]


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (top level or inside functions)."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        for node, target, names in _imports(name, path, mods):
            subs = [module for _, _, module in names if module]
            found = subs if isinstance(node, ast.ImportFrom) and node.module is None and subs else [target, *subs]
            graph[name] |= {m for m in found if m in mods and m != name}
    return graph


def _private(text: str) -> bool:
    return text.startswith("_") and not text.startswith("__")


def _private_imports(files: dict[str, Path]) -> list[str]:
    """Where a module imports another module's private name (``from .x import _y``) or reads one
    through a module it imported (``x._y``)."""
    mods = _modules() | files
    found = []
    for name, path in files.items():
        modules = set()
        for node, target, names in _imports(name, path, mods):
            for imported, bound, module in names:
                if module:
                    modules.add(bound)
                elif _private(imported) and target != name:
                    found.append(f"{name}: {target}.{imported}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                    and _private(node.attr):
                found.append(f"{name}: {node.value.id}.{node.attr}")
    return found


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
    assert "clip_interpret.cli.common" in graph and graph["clip_interpret.cli.ablate"]  # the scan sees the package
    assert _cycles(graph) == []


def _package_graph(graph) -> dict[str, set[str]]:
    """The module graph folded to the package's rooms: each sub-package (``clip_interpret.runstore``)
    and each top-level module is one node."""
    def room(module):
        return ".".join(module.split(".")[:2])

    folded = {}
    for module, targets in graph.items():
        folded.setdefault(room(module), set()).update(room(t) for t in targets if room(t) != room(module))
    return folded


def test_no_cycle_between_packages_including_imports_inside_functions():
    folded = _package_graph(_graph())
    assert {"clip_interpret.runstore", "clip_interpret.engine", "clip_interpret.toyworld"} <= set(folded)
    assert _cycles(folded) == []


def test_the_package_fold_sees_a_cycle_that_no_module_pair_has():
    graph = {"p.a.x": {"p.b.y"}, "p.b.y": set(), "p.b.z": {"p.a.w"}, "p.a.w": set()}
    assert _cycles(graph) == []
    assert _cycles(_package_graph(graph)) == [["p.a", "p.b", "p.a"]]


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_module_imports_another_modules_private_name():
    assert _private_imports(_modules()) == []


def test_the_private_name_finder_finds_both_forms(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from clip_interpret.ablation import _hidden\n")
    (tmp_path / "b.py").write_text("from clip_interpret import viz\nviz._secret()\nviz.pyplot()\n")
    (tmp_path / "c.py").write_text("from clip_interpret.viz import pyplot as _plt\n")  # renaming a public name
    found = _private_imports({"clip_interpret.a": tmp_path / "a.py", "clip_interpret.b": tmp_path / "b.py",
                              "clip_interpret.c": tmp_path / "c.py"})
    assert found == ["clip_interpret.a: clip_interpret.ablation._hidden", "clip_interpret.b: viz._secret"]


def _private_names_of(path: Path, class_name: str) -> set[str]:
    """The private attributes and methods a class defines (``self._x = ...`` and ``def _x``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for inner in ast.walk(node):
                if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(inner.name)
                elif isinstance(inner, ast.Attribute) and isinstance(inner.ctx, ast.Store):
                    names.add(inner.attr)
    return {n for n in names if n.startswith("_") and not n.endswith("__")}


def test_run_internals_are_read_only_by_the_run():
    """No code outside the run store touches a Run's private attributes or methods."""
    private = _private_names_of(ROOT / "runstore" / "store.py", "Run")
    assert {"_map", "_rows", "_images"} <= private  # the walk sees the class (else this test checks nothing)
    offenders = []
    for path in ROOT.rglob("*.py"):
        if "runstore" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private and \
                    getattr(node.value, "id", None) not in ("self", "cls"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert offenders == []


def test_every_module_opens_with_what_it_is_for():
    missing = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
               if p.name != "__main__.py" and not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []


def test_the_old_import_paths_name_the_same_objects():
    import clip_interpret.cluster as old_engine
    import clip_interpret.engine as engine
    import clip_interpret.runstore.store as store
    from clip_interpret.index import index_images
    from clip_interpret.index.store import Run
    from clip_interpret.runstore import index_images as new_index_images

    assert Run is store.Run and index_images is new_index_images
    assert old_engine.map_shards is engine.map_shards and old_engine.Engine is engine.Engine


def test_only_the_run_store_reads_the_raw_manifest():
    """Everything else asks the run's typed facts (``run.model_spec``, ``run.stamp()``, ...)."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        if "runstore" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "manifest" and not isinstance(node.ctx, ast.Store):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == \
                    "read_manifest":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
