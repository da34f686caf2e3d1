"""The package's import graph, read from the source: no module imports one that imports it back,
however far round and wherever the import sits (a function-level import that dodges the cycle
at import time still ties the two modules into one)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "platform" / "noiseclr"
LAYOUT = ROOT / "docs" / "layout.md"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (a `from pkg import name` counts as pkg.name
    when that is a module, else as pkg)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]  # fmt: skip
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def stages() -> list[list[str]]:
    """docs/layout.md's stage order: a numbered line per stage, its parts in backquotes
    (`bank/` is the package noiseclr.bank, `cli.py` the module noiseclr.cli)."""
    section = LAYOUT.read_text().split("## Stage order", 1)[1].split("\n## ", 1)[0]
    found = []
    for line in re.findall(r"^\d+\. .*$", section, re.M):
        parts = re.findall(r"`([\w/.]+)`", line.split(":", 1)[1].split(";")[0])
        found.append(["noiseclr." + p.removesuffix("/").removesuffix(".py").replace("/", ".") for p in parts])
    return found


def stage_of(module: str, order: list[list[str]]) -> int | None:
    """The stage of the longest named part `module` belongs to (None: in none)."""
    best = None
    for n, parts in enumerate(order):
        for part in parts:
            if (module == part or module.startswith(part + ".")) and (
                best is None or len(part) > len(best[1])
            ):
                best = (n, part)
    return best[0] if best else None


def against_the_order(graph: dict[str, set[str]], order: list[list[str]]) -> list[str]:
    """Each import of a later stage by an earlier one, as "a (stage i) -> b (stage j)"."""
    bad = []
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            i, j = stage_of(a, order), stage_of(b, order)
            if i is not None and j is not None and j > i:
                bad.append(f"{a} (stage {i + 1}) -> {b} (stage {j + 1})")
    return bad


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_the_package_imports_one_that_imports_it_back():
    graph = import_graph()
    assert "noiseclr.bank" in graph["noiseclr.export"]  # a module-level import
    assert "noiseclr.workflows.discover" in graph["noiseclr.cli"]  # one inside a function
    assert cycles(graph) == []


def test_every_module_sits_in_a_stage_and_imports_only_its_own_or_earlier_ones():
    order = stages()
    assert len(order) >= 8 and ["noiseclr.bank"] in order  # the section was read
    graph = import_graph()
    assert [m for m in graph if m != "noiseclr" and stage_of(m, order) is None] == []
    assert against_the_order(graph, order) == []


def test_the_order_check_catches_an_import_against_it():
    order = [["noiseclr.errors"], ["noiseclr.bank"], ["noiseclr.discovery"]]
    graph = {"noiseclr.bank.record": {"noiseclr.discovery.step", "noiseclr.errors"}}
    assert against_the_order(graph, order) == [
        "noiseclr.bank.record (stage 2) -> noiseclr.discovery.step (stage 3)"
    ]
    assert stage_of("noiseclr.discovery.bank", [["noiseclr.discovery"], ["noiseclr.discovery.bank"]]) == 1
