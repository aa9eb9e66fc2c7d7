"""Layers point down: the import graph of src/kedit has no cycle, and no module imports another
module's private name (``from kedit.x import _y``).

Every import counts, those inside functions too: an import deferred into a function still ties the
two modules together, it only hides the tie from a reader of the module's head."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "kedit"


def module_files(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``src/package`` (a package is its ``__init__``)."""
    out = {}
    for f in sorted((src / package).rglob("*.py")):
        parts = f.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imported_names(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """``(target module, imported name or None, line)`` for each import of a package module in ``path``.

    ``from a.b import c`` names module ``a.b.c`` when that is a module, else name ``c`` of ``a.b``."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                target = nearest_module(a.name, modules)
                if target:
                    out.append((target, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".") if is_pkg else module.split(".")[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules:
                    out.append((sub, None, node.lineno))
                else:
                    target = nearest_module(base, modules)
                    if target:
                        out.append((target, a.name, node.lineno))
    return out


def nearest_module(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(src: Path = SRC, package: str = PACKAGE) -> dict[str, dict[str, list]]:
    """module -> {imported module: [(name, line), ...]} over the whole package."""
    modules = module_files(src, package)
    graph: dict[str, dict[str, list]] = {m: {} for m in modules}
    for m, path in modules.items():
        for target, name, line in imported_names(m, path, modules):
            if target != m:
                graph[m].setdefault(target, []).append((name, line))
    return graph


def cycles(graph: dict[str, dict[str, list]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), less a package and its own
    submodule importing each other (the package's face re-exporting what the submodule defines)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return [c for c in found if not (len(c) == 2 and c[1].startswith(c[0] + "."))]


def private_imports(graph: dict[str, dict[str, list]]) -> list[str]:
    """``module:line imports _name from other`` for every private name taken from another module."""
    return [f"{m}:{line} imports {name} from {target}" for m, targets in graph.items()
            for target, names in targets.items() for name, line in names
            if name and name.startswith("_") and not (name.startswith("__") and name.endswith("__"))]


def test_src_kedit_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles in src/kedit:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_module_imports_a_private_name_of_another():
    found = private_imports(import_graph())
    assert not found, "private names imported across modules:\n" + "\n".join(found)


@pytest.fixture
def toy(tmp_path):
    """A package ``toy`` built file by file: ``toy({"a.py": "...", ...})`` returns its import graph."""
    def build(files: dict[str, str]) -> dict[str, dict[str, list]]:
        for rel, text in {"__init__.py": "", **files}.items():
            p = tmp_path / "toy" / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        return import_graph(tmp_path, "toy")
    return build


def test_a_cycle_through_a_function_level_import_is_found(toy):
    g = toy({"a.py": "from toy.b import f\n", "b.py": "def f():\n    from toy import c\n",
             "c.py": "def g():\n    from .a import f\n"})
    assert cycles(g) == [["toy.a", "toy.b", "toy.c"]]


def test_layers_that_only_point_down_have_no_cycle(toy):
    g = toy({"base.py": "X = 1\n", "mid.py": "from toy.base import X\n",
             "top.py": "def f():\n    from toy.mid import X\n    import toy.base\n"})
    assert cycles(g) == []


def test_a_package_re_exporting_its_submodule_is_not_a_cycle(toy):
    g = toy({"__init__.py": "from toy.sub import Y\n", "sub.py": "def f():\n    from toy import Z\n"})
    assert cycles(g) == []


def test_private_names_across_modules_are_found_and_dunders_and_own_names_are_not(toy):
    g = toy({"a.py": "_hidden = 1\n__version__ = '1'\n",
             "b.py": "from toy.a import __version__\nfrom . import a\n",
             "c.py": "def f():\n    from .a import _hidden\n"})
    assert private_imports(g) == ["toy.c:2 imports _hidden from toy.a"]
