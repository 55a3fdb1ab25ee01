"""The house's shape (docs/architecture.md): imports run one way, down, and no two modules import each other.

Read from the source with `ast`, so every import counts: at the top of a module, inside a function
(the lazy imports that keep torch out of `hm --help`) and under TYPE_CHECKING. A name taken from a wing
(`from headmaster.heads import load_head`) counts as an import of the module that defines it (the
wing's `_EXPORTS` table).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "headmaster"

# Lowest first. A module may import its own wing and the wings below it, never one above.
LEVELS = {
    "foundations": 0,  # headmaster/*.py but the shells: store, workspace, config, fileops
    "embedding": 1,
    "heads": 2,
    "evaluation": 3,
    "curation": 4,
    "finetune": 5,
    "web": 5,
    "daemon": 6,
    "shells": 7,  # cli.py (hm), ctl.py (hmctl), __main__.py
}
SHELLS = {"headmaster.cli", "headmaster.ctl", "headmaster.__main__"}
MAX_TOP_LEVEL = 15


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def wing_of(module: str) -> str:
    if module in SHELLS:
        return "shells"
    parts = module.split(".")
    if len(parts) == 2 or module == "headmaster":
        return "foundations"
    return parts[1]


def wing_exports(tree: ast.Module, package: str) -> dict[str, str]:
    """The `_EXPORTS = {"name": "module", ...}` table of a wing's __init__.py."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            table = ast.literal_eval(node.value)
            return {name: f"{package}.{mod}" for name, mod in table.items()}
    return {}


def imports_of(module: str, path: Path, known: dict[str, Path], exports: dict[str, dict[str, str]]) -> set[str]:
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("headmaster"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("headmaster"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:
                    found.add(sub)
                elif alias.name in exports.get(target, {}):
                    found.add(exports[target][alias.name])
                else:
                    found.add(target)
    found.discard(module)
    return {m for m in found if m in known and m != "headmaster"}


def graph() -> dict[str, set[str]]:
    known = modules()
    exports = {m: wing_exports(ast.parse(p.read_text()), m) for m, p in known.items() if p.name == "__init__.py"}
    edges = {m: imports_of(m, p, known, exports) for m, p in known.items()}
    for wing, table in exports.items():  # the lazy table is how a wing's names are reached, not an import of its own
        edges[wing] -= set(table.values())
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
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


def test_every_wing_is_known():
    wings = {wing_of(m) for m in modules()}
    assert wings <= set(LEVELS), f"a wing without a level here: {sorted(wings - set(LEVELS))}"


def test_top_level_is_small():
    entries = [p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"]
    assert len(entries) <= MAX_TOP_LEVEL, sorted(entries)


def test_no_module_imports_itself_back():
    assert cycles(graph()) == []


def test_imports_run_down():
    upward = [f"{m} -> {d}" for m, deps in graph().items() for d in deps
              if LEVELS[wing_of(d)] > LEVELS[wing_of(m)]]
    assert upward == []


def test_the_checker_sees_a_loop_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert LEVELS[wing_of("headmaster.daemon.service")] > LEVELS[wing_of("headmaster.web.app")]
    assert wing_of("headmaster.store") == "foundations" and wing_of("headmaster.cli") == "shells"
