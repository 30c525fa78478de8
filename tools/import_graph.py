"""Print peering's import graph, package by package, and every import cycle between its modules.

    .venv/bin/python tools/import_graph.py            # the graph between peering's top-level parts
    .venv/bin/python tools/import_graph.py --modules  # module by module

Every import counts, also those inside functions (lazy imports) and under ``TYPE_CHECKING``: a cycle
through a lazy import is still a cycle a maintainer has to keep in their head. Exit code 1 when there
is a cycle. `tests/test_layers.py` checks the same graph against the house rules.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import grimp


def part(module: str, depth: int = 2) -> str:
    """``peering.lightning.callback`` -> ``peering.lightning`` (depth 2)."""
    return ".".join(module.split(".")[:depth])


def module_graph() -> dict[str, set[str]]:
    """Every peering module and the peering modules it imports."""
    graph = grimp.build_graph("peering", cache_dir=None)
    return {m: set(graph.find_modules_directly_imported_by(m)) for m in sorted(graph.modules)}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def package_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between peering's top-level parts (a package and its modules count as one)."""
    parts: dict[str, set[str]] = defaultdict(set)
    for source, targets in edges.items():
        for target in targets:
            if part(source) != part(target) and part(target) != "peering.__init__":
                parts[part(source)].add(part(target))
        parts.setdefault(part(source), set())
    parts.pop("peering", None)  # the package's __init__: the public API re-exports everything
    for targets in parts.values():
        targets.discard("peering")
    return parts


def main(argv: list[str]) -> int:
    edges = module_graph()
    shown = edges if "--modules" in argv else package_edges(edges)
    width = max(map(len, shown), default=0)
    for source in sorted(shown):
        print(f"{source:<{width}} -> {', '.join(sorted(shown[source])) or '-'}")
    found = cycles({m: {t for t in ts if t != "peering"} for m, ts in edges.items() if m != "peering"})
    print(f"\n{len(found)} import cycle(s) between modules" + (":" if found else ""))
    for component in found:
        print("  " + " <-> ".join(component))
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
