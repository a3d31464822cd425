"""The import structure: no module imports, directly or through others, a module that imports it back.
(`lint-imports` in `make test` checks the layers; this checks every module against every other.)"""

from __future__ import annotations

import grimp


def _strongly_connected(graph: grimp.ImportGraph, modules: set[str]) -> list[set[str]]:
    """Tarjan's algorithm over the package's own modules."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(module: str) -> None:
        index[module] = low[module] = counter[0]
        counter[0] += 1
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module) & modules:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == module:
                    break
            found.append(component)

    for module in sorted(modules):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_back():
    graph = grimp.build_graph("sparse_expansion")
    modules = graph.find_descendants("sparse_expansion") | {"sparse_expansion"}
    assert len(modules) > 40
    cycles = [sorted(c) for c in _strongly_connected(graph, modules) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_finder_finds_a_cycle():
    class Graph:
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

        def find_modules_directly_imported_by(self, module):
            return self.edges[module]

    components = _strongly_connected(Graph(), {"a", "b", "c", "d"})
    assert sorted(map(sorted, components)) == [["a", "b", "c"], ["d"]]
