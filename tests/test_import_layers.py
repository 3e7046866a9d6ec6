"""The house's floors, read from the code's own imports (every `import`, also inside functions).

- `core/` is the ground floor: it imports no component and not the top (`service/`);
- the components (generator, judge, trainer) import `core/` and never `service/` (nor one another's
  internals beyond what DESIGN allows: see ALLOWED below);
- there is no import cycle between modules anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "generator", "judge", "trainer", "service")
COMPONENTS = ("generator", "judge", "trainer")


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_of(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            found = []
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # `from pkg import sub` imports the submodule; the package itself only for a name defined in it
                found = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for f in found:
                # the longest prefix that is one of ours: `from core import bus` -> core.bus, `core.bus.X` -> core.bus
                while f and f not in modules:
                    f = f.rpartition(".")[0]
                if f and f != name:
                    targets.add(f)
        graph[name] = targets
    return graph


def _top(module: str) -> str:
    return module.split(".")[0]


def test_the_ground_floor_imports_no_component_and_not_the_top():
    bad = sorted(f"{m} -> {t}" for m, ts in _graph().items() if _top(m) == "core"
                 for t in ts if _top(t) != "core")
    assert not bad, bad


def test_no_component_imports_the_top():
    bad = sorted(f"{m} -> {t}" for m, ts in _graph().items() if _top(m) in COMPONENTS
                 for t in ts if _top(t) == "service")
    assert not bad, bad


def test_no_import_cycle():
    graph = _graph()
    # Tarjan's strongly connected components: a component of more than one module is a cycle
    index, low, on, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                cycles.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_graph_sees_imports_at_every_depth():
    graph = _graph()  # the test would pass on an empty graph: check it reads what is there
    assert "core.contracts" in graph["core.bus"]
    assert "core.errors" in graph["judge.service"]  # a lazy import, inside a function
    assert "judge.base" in graph["judge.composite"]
