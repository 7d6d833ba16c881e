"""The package's modules depend on each other one way: no import cycle inside ``mio_jax/``,
counting the imports written inside functions as well as those at the top of a module."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "mio_jax")


def _modules() -> dict[str, str]:
    """Dotted module name -> file path, for every module of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            out[dotted.removesuffix(".__init__")] = path
    return out


def _imports(path: str, module: str, known) -> list[tuple[str, int, bool]]:
    """(imported mio_jax module, line, written inside a function or class) of one file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    top = {id(node) for node in tree.body}
    # `if TYPE_CHECKING:` / try blocks at module level are still module level
    for node in tree.body:
        for child in ast.walk(node):
            if isinstance(node, (ast.If, ast.Try)):
                top.add(id(child))
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` depends on pkg.sub when sub is a module, else on pkg
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import mio_jax.x.y as z` -> mio_jax.x.y
                name = name.rpartition(".")[0]
            if name and name != module:
                out.append((name, node.lineno, id(node) not in top))
    return out


def _graph():
    known = _modules()
    return known, {m: _imports(p, m, known) for m, p in known.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_inside_the_package():
    known, graph = _graph()
    assert "mio_jax.train" in known and "mio_jax.models.llama" in known
    edges = {m: {name for name, _, _ in imports} for m, imports in graph.items()}
    cycles = _cycles(edges)
    detail = []
    for comp in cycles:
        for m in comp:
            for name, line, local in graph[m]:
                if name in comp:
                    where = "inside a function" if local else "at the top"
                    detail.append(f"  {known[m]}:{line} imports {name} ({where})")
    assert not cycles, "import cycles:\n" + "\n".join(detail)


def test_function_local_imports_of_the_package_say_why():
    """An import of a mio_jax module written inside a function carries its reason on the
    same line (a comment), e.g. a heavy optional dependency loaded only when used."""
    known, graph = _graph()
    bare = []
    for module, imports in graph.items():
        lines = open(known[module], encoding="utf-8").read().splitlines()
        for name, line, local in imports:
            if local and "#" not in lines[line - 1]:
                bare.append(f"{known[module]}:{line} imports {name}")
    assert not bare, "function-local imports without a reason:\n" + "\n".join(bare)


@pytest.mark.parametrize("source,want", [
    ("from mio_jax.models import llama\n", [("mio_jax.models.llama", 1, False)]),
    ("def f():\n    from mio_jax import train  # lazy: why\n", [("mio_jax.train", 2, True)]),
    ("from . import sharding\n", [("mio_jax.sharding", 1, False)]),
    ("from .models.weights import weight_specs\n", [("mio_jax.models.weights", 1, False)]),
])
def test_imports_are_read_from_source(source, want, tmp_path):
    known, _ = _graph()
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert _imports(str(path), "mio_jax.probe", known) == want


def test_the_library_never_imports_its_test_harness():
    """``mio_jax.testing`` (tiny artefacts, the GCS emulator, test verifiers) serves tests;
    no module outside it imports it, so the library runs without its test dependencies."""
    known, graph = _graph()
    users = [f"{known[m]}:{line}" for m, imports in graph.items()
             if not m.startswith("mio_jax.testing")
             for name, line, _ in imports if name.startswith("mio_jax.testing")]
    assert "mio_jax.testing.gcs_emulator" in known
    assert not users, users
