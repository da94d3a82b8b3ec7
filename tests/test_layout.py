"""The package layout the design promises: stage sub-packages, a small root, and no import cycles."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "exporter"
STAGES = ("model", "prune", "export", "runtime", "judge", "ship", "bench")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["tinyprune", *parts])


def _imports(path: Path) -> set[str]:
    """Every tinyprune module a file imports, at module level or inside functions."""
    me = _module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            if mod.startswith("tinyprune"):
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tinyprune"))
    return found


def _unit(module: str) -> str:
    """The layer a module belongs to: its stage package, or the root module itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "tinyprune"


def test_root_is_small_and_stages_exist():
    root_modules = [p.name for p in PKG.glob("*.py")]
    assert len(root_modules) <= 10, root_modules
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse((PKG / stage / "__init__.py").read_text()))
        assert doc and "takes" in doc and "gives" in doc, f"{stage}/__init__.py must say what the stage takes and gives"


def test_no_import_cycles_between_stages():
    files = [p for p in PKG.rglob("*.py") if p.name != "cli.py" and "demo" not in p.parts]
    units = {p.stem for p in PKG.glob("*.py")} | set(STAGES) | {"workflows"}
    edges: dict[str, set[str]] = {u: set() for u in units}
    for path in files:
        src = _unit(_module_name(path))
        for mod in _imports(path):
            dst = _unit(mod)
            if dst in units and dst != src and dst != "__init__":
                edges.setdefault(src, set()).add(dst)

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(u for u in edges if u in reach(u))
    assert not cycles, {u: sorted(edges[u]) for u in cycles}
    assert "workflows" not in set().union(*(edges[s] for s in STAGES)), "a stage imports a workflow"
