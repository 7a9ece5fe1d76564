"""The package's shape: no import cycle among ``metakd_ray``'s modules, and no module over 400 lines.

The import graph is read statically with ``ast``: every ``import`` / ``from ... import`` of a package module,
at module level or inside a function, relative imports resolved. ``from pkg.x import y`` is an edge to ``pkg.x.y``
when that is a module (or package), else to ``pkg.x``; a package ``__init__`` importing its own submodules is an
edge like any other. Importing ``pkg.x.y`` also runs ``pkg.x``'s ``__init__``, but that implicit edge is not added:
a submodule may import its siblings without its package's ``__init__`` counting as a cycle. Imports under
``if TYPE_CHECKING:`` never run and are left out (``metakd_ray.data`` uses them to type its lazy exports). Cycles are
the strongly connected components of more than one module (Tarjan's algorithm).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "metakd_ray"
MAX_LINES = 400


# ----------------------------------------------------------------------------------------------------------
# The import graph
# ----------------------------------------------------------------------------------------------------------


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file of every module under ``root`` (the directory of ``package``); ``__init__.py`` files
    name their package."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join([package, *parts])] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, skipping the bodies of ``if TYPE_CHECKING:`` (their ``else`` still runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package modules it imports (edges as the module docstring says)."""
    files = module_names(root, package)
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:  # relative: from the module's package, one level up per extra dot
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in files else source)
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted; in no particular order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            advanced = False
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                out.append(sorted(component))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    return sorted(c for c in strongly_connected(graph) if len(c) > 1)


def describe(graph: dict[str, set[str]], found: list[list[str]]) -> str:
    lines = []
    for component in found:
        members = set(component)
        edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
        lines.append(f"cycle among {', '.join(component)}:\n    " + "\n    ".join(edges))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# The real package
# ----------------------------------------------------------------------------------------------------------


def test_no_import_cycles():
    graph = import_graph(PACKAGE, "metakd_ray")
    assert len(graph) > 10 and sum(map(len, graph.values())) > 10  # the walk found the package and its imports
    found = cycles(graph)
    assert not found, "import cycles in metakd_ray:\n" + describe(graph, found)


def test_no_module_over_400_lines():
    counts = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in sorted(PACKAGE.rglob("*.py"))}
    assert counts, "no modules found"
    over = {p: n for p, n in counts.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: " + ", ".join(
        f"{p} ({n})" for p, n in sorted(over.items(), key=lambda kv: -kv[1]))


# ----------------------------------------------------------------------------------------------------------
# The cycle finder itself, on synthetic packages
# ----------------------------------------------------------------------------------------------------------


def write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_tarjan_on_plain_graphs():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"f"}, "g": set()}
    assert cycles(graph) == [["a", "b", "c"], ["d", "e"]]  # a self-loop is not a cycle between modules
    assert sorted(map(tuple, strongly_connected(graph))) == [("a", "b", "c"), ("d", "e"), ("f",), ("g",)]
    # long chain: iterative, no recursion limit
    chain = {str(i): {str(i + 1)} for i in range(5000)} | {"5000": {"0"}}
    assert [len(c) for c in cycles(chain)] == [5001]


def test_edges_resolve_modules_attributes_and_relative_imports(tmp_path):
    root = write_package(tmp_path / "pkg", {
        "__init__.py": "",
        "a.py": "import pkg.b\nfrom pkg.sub import mod\nfrom pkg.sub import helper\n",
        "b.py": "from . import c\nfrom .c import thing\n",
        "c.py": "def f():\n    from .sub.mod import x\n    import os\n",
        "d.py": "import pkg.sub.mod as m\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
                "else:\n    from pkg import b\n",
        "sub/__init__.py": "helper = 1\n",
        "sub/mod.py": "from .. import c\nfrom ..b import name\n",
    })
    graph = import_graph(root, "pkg")
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg.b", "pkg.sub.mod", "pkg.sub"},  # mod is a module; helper an attribute of pkg.sub
        "pkg.b": {"pkg.c"},
        "pkg.c": {"pkg.sub.mod"},  # function-level, relative
        "pkg.d": {"pkg.sub.mod", "pkg.b"},  # the TYPE_CHECKING import is left out, its else branch kept
        "pkg.sub": set(),
        "pkg.sub.mod": {"pkg.c", "pkg.b"},  # no implicit edge to pkg.sub
    }
    assert cycles(graph) == [["pkg.b", "pkg.c", "pkg.sub.mod"]]


def test_a_dag_package_passes(tmp_path):
    root = write_package(tmp_path / "pkg", {
        "__init__.py": "",
        "base.py": "import json\n",
        "mid.py": "from pkg.base import x\nfrom pkg import base\n",
        "top.py": "from pkg.mid import y\n\ndef run():\n    from pkg.sub.leaf import z\n",
        "sub/__init__.py": "from pkg.sub.leaf import z\n",  # a package importing its own submodule
        "sub/leaf.py": "from pkg import mid\nfrom . import other\n",  # importing a sibling: sub/__init__ not an edge
        "sub/other.py": "",
    })
    graph = import_graph(root, "pkg")
    assert graph["pkg.sub"] == {"pkg.sub.leaf"}
    assert graph["pkg.sub.leaf"] == {"pkg.mid", "pkg.sub.other"}
    assert cycles(graph) == []


def test_a_function_level_import_closes_a_cycle(tmp_path):
    root = write_package(tmp_path / "pkg", {
        "__init__.py": "",
        "one.py": "from pkg.two import f\n",
        "two.py": "def f():\n    from pkg import one\n    return one\n",
    })
    graph = import_graph(root, "pkg")
    found = cycles(graph)
    assert found == [["pkg.one", "pkg.two"]]
    message = describe(graph, found)
    assert "pkg.one -> pkg.two" in message and "pkg.two -> pkg.one" in message


def test_a_package_init_importing_a_submodule_that_imports_it_is_a_cycle(tmp_path):
    root = write_package(tmp_path / "pkg", {
        "__init__.py": "",
        "sub/__init__.py": "from .impl import run\n",
        "sub/impl.py": "from pkg.sub import CONSTANT\n",  # an attribute of pkg.sub: an explicit edge to it
    })
    assert cycles(import_graph(root, "pkg")) == [["pkg.sub", "pkg.sub.impl"]]
