"""The package's shape (DESIGN.md): no import cycles inside jaxtune/, and no module over 500 lines.

The import graph is read from the source with `ast`, every import statement included — those inside functions
too, since a deferred import is still a dependency (it only hides the cycle from the interpreter until the call):

    import a.b                 -> edge to a.b
    from a.b import c          -> edge to a.b.c when that is a module, else to a.b (c is a name in it)
    from . import c / from ..x import y   resolved against the importing module's package, then as above

Only jaxtune-internal edges count. The implicit edge to a parent package (importing a.b.c runs a/__init__.py
and a/b/__init__.py first) is left out: a package's __init__ re-exporting its submodules is not a cycle of the
design's kind. A cycle is a strongly connected component of more than one module; a module importing itself is
ignored. (Run on commit ae4051c, before "a run is a value", it reports train.loop <-> train.rl_loop and
train.sharding <-> train.state.)
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxtune"
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every jaxtune module `name` (at `path`) imports, by the rules of the module docstring."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = package[: len(package) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in known else origin for a in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` where c is not a module (rare): its longest prefix that is one
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def strongly_connected(g: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components of more than one node, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(g):
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(g[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sorted(out)


def a_cycle(component: list[str], g: dict[str, set[str]]) -> list[str]:
    """One concrete cycle through the component's first module (a shortest one, by breadth-first search)."""
    inside = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(g[node] & inside):
                if child == start:
                    return paths[node] + [start]
                if child not in paths:
                    paths[child] = paths[node] + [child]
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"{component} is not strongly connected")


def test_the_graph_reader_on_known_edges(tmp_path):
    """The reader itself, on imports whose targets are known: a deferred (in-function) import, a relative one,
    and `from package import module`."""
    g = graph()
    assert g, "no modules found under jaxtune/"
    assert all(name.startswith("jaxtune") for name in g)
    # relative imports, `from package import module` and a deferred import, in a made-up module
    known = {
        "jaxtune.train",
        "jaxtune.train.loop",
        "jaxtune.train.step",
        "jaxtune.methods",
        "jaxtune.methods.dpo",
    }
    source = (
        "from . import step\nfrom .step import make\nfrom ..methods import dpo\nfrom ..methods import METHODS\n"
        "import jaxtune.methods.dpo as d\ndef f():\n    from jaxtune.train import loop\n"
    )
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    got = imports_of("jaxtune.train.probe", probe, known)
    assert got == {"jaxtune.train.step", "jaxtune.methods.dpo", "jaxtune.methods", "jaxtune.train.loop"}


def test_the_cycle_finder_on_a_made_up_graph():
    """a <-> b, and c -> d -> e -> c with a tail e -> f: two components; a self loop (g) and a chain are none."""
    g = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c", "f"}, "f": set(), "g": {"g"}, "h": {"a"}}
    assert strongly_connected(g) == [["a", "b"], ["c", "d", "e"]]
    assert a_cycle(["c", "d", "e"], g) == ["c", "d", "e", "c"]


def test_no_import_cycles_inside_the_package():
    g = graph()
    cycles = strongly_connected(g)
    report = "\n".join(
        f"  {len(c)} modules: {', '.join(c)}\n    e.g. {' -> '.join(a_cycle(c, g))}" for c in cycles
    )
    assert not cycles, f"import cycles inside jaxtune/ (DESIGN.md: none):\n{report}"


def test_no_module_over_500_lines():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in sorted(PACKAGE.rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (DESIGN.md style 11): {long}"
