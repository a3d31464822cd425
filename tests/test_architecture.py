"""The import structure: no module imports, directly or through others, a module that imports it back.
(`lint-imports` in `make test` checks the layers and cycles between siblings; this checks every module against
every other, with networkx's strongly connected components over grimp's import graph.)"""

from __future__ import annotations

import sys
import textwrap

import grimp
import networkx as nx


def import_cycles(package: str, cache_dir: str | None = None) -> list[list[str]]:
    """Each set of the package's modules that import one another in a loop, sorted; [] when there is none."""
    graph = grimp.build_graph(package, cache_dir=cache_dir)
    modules = graph.find_descendants(package) | {package}
    imports = nx.DiGraph()
    imports.add_nodes_from(modules)
    imports.add_edges_from((module, imported) for module in modules
                           for imported in graph.find_modules_directly_imported_by(module) & modules)
    cycles = [sorted(c) for c in nx.strongly_connected_components(imports) if len(c) > 1]
    cycles += [[m] for m in nx.nodes_with_selfloops(imports)]
    return sorted(cycles)


def test_no_module_imports_itself_back():
    graph = grimp.build_graph("sparse_expansion")
    assert len(graph.find_descendants("sparse_expansion")) > 40  # the whole package, not an empty graph
    cycles = import_cycles("sparse_expansion")
    assert not cycles, f"import cycles: {cycles}"


def test_a_cycle_through_several_modules_is_found(tmp_path, monkeypatch):
    """A real package on disk: a -> b -> c.d -> a loops (c.d only through a function-level import), e imports
    a without being imported back."""
    root = tmp_path / "cyclic_pkg"
    (root / "c").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from cyclic_pkg import b\n",
        "b.py": "import cyclic_pkg.c.d\n",
        "c/__init__.py": "",
        "c/d.py": "def late():\n    from cyclic_pkg.a import b\n    return b\n",
        "e.py": "from cyclic_pkg.a import b\n",
    }
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cyclic_pkg", raising=False)
    assert import_cycles("cyclic_pkg", cache_dir=None) == [["cyclic_pkg.a", "cyclic_pkg.b", "cyclic_pkg.c.d"]]
    (root / "c" / "d.py").write_text("def late():\n    return None\n")
    assert import_cycles("cyclic_pkg", cache_dir=None) == []
