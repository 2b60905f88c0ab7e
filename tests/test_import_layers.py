"""Import layering of ``llmfoundry``, read from the source (ast; nothing is imported).

Every ``import`` / ``from ... import`` in a module counts, at module level or inside a function (a lazy import only
defers a circle). An import names the module it loads: ``from llmfoundry.kernels import lion`` is an edge to
``llmfoundry.kernels.lion``, ``from llmfoundry.models.mpt import MPTConfig`` one to the package
``llmfoundry.models.mpt``. The implicit import of a module's parent packages is not an edge (every submodule
"imports" its package, which may import it back: that is how packages work, not a circle).

Run as a script to print the import circles: ``python tests/test_import_layers.py``.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "llmfoundry"


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package`` (a package is named by its ``__init__.py``)."""
    mods = {}
    for f in sorted((root / package).rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = f
    return mods


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[:len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, file: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``module`` imports anywhere in its source."""
    out = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(node, module, file.name == "__init__.py")
            for a in node.names:
                out.add(f"{src}.{a.name}" if f"{src}.{a.name}" in known else src)
    return {m for m in out if m in known and m != module}


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    files = module_files(root, package)
    return {m: imports_of(m, f, set(files)) for m, f in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module: ``[a, b, ..., a]``."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_circle_in(graph, comp) for comp in comps]


def _circle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest circle through the first module of ``comp`` (breadth-first, inside ``comp``)."""
    start = min(comp)
    prev, queue = {start: None}, [start]
    for v in queue:
        for w in sorted(graph[v] & comp):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return [start] + path[::-1][1:] + [start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    raise AssertionError(f"no circle through {start}")  # pragma: no cover - comp is strongly connected


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import circles in llmfoundry:\n" + "\n".join(" -> ".join(c) for c in found)


def test_kernels_import_nothing_above_them():
    """Kernels are the bottom layer: nothing in llmfoundry.kernels imports llmfoundry.train or llmfoundry.models."""
    graph = import_graph()
    above = ("llmfoundry.train", "llmfoundry.models")
    bad = [f"{m} imports {d}" for m in sorted(graph) if m.split(".")[:2] == ["llmfoundry", "kernels"]
           for d in sorted(graph[m]) if any(d == a or d.startswith(a + ".") for a in above)]
    assert not bad, "\n".join(bad)


def test_mpt_config_does_not_import_hf():
    """The HF mapping depends on the config, not the other way round (not even lazily)."""
    assert "llmfoundry.models.mpt.hf" not in import_graph()["llmfoundry.models.mpt.config"]


def test_finder_sees_lazy_imports_and_circles(tmp_path):
    """The checker itself: a function-level import closing a circle is found, a package importing its own
    submodule is not a circle, and relative imports resolve."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.a import f\n")
    (pkg / "a.py").write_text("import pkg.b\ndef f():\n    pass\n")
    (pkg / "b.py").write_text("def g():\n    from pkg import a\n")
    (pkg / "sub" / "__init__.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("from ..b import g\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.sub"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.b"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]


if __name__ == "__main__":
    found = cycles(import_graph())
    for c in found:
        print(" -> ".join(c))
    print(f"{len(found)} import circle(s) among {PACKAGE} modules")
    sys.exit(1 if found else 0)
