"""The package's shape (docs/architecture.md §1): imports only go down the layer table, no module imports
itself back through a cycle, and files and functions stay small enough to read.

    python -m pytest -q tests/test_layers.py          # the check; `python tests/test_layers.py` prints the graph
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "framecast"

# Top-level units of framecast, lowest first; a unit may import units of strictly lower layers (and itself).
LAYERS = [
    ["errors", "files"],
    ["schema", "pretrained"],
    ["config_upgrade", "rng"],
    ["config", "flow"],
    ["spec"],
    ["models"],
    ["sampling"],
    ["rollout"],
    ["data"],
    ["train"],
    ["media", "generate"],
    ["objectives", "eval", "stream"],
    ["play", "stages"],
    ["runs"],
    ["recipe"],
    ["quickstart", "bench", "plan"],
    ["cli_data"],
    ["cli"],
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}
MAX_FILE_LINES = 350
MAX_FUNCTION_LINES = 60
LONG_OK = "# long:"  # a function may be longer with this marker and a reason on its `def` line or the one above


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """framecast modules imported anywhere in `path` (function-local imports included)."""
    name = module_name(path)
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("framecast")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("framecast"):
                continue
            for a in node.names:  # `from . import flow` imports the module framecast.flow
                sub = f"{mod}.{a.name}"
                out.add(sub if (PKG.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                        or (PKG.parent / sub.replace(".", "/")).is_dir() else mod)
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(PKG.rglob("*.py"))}


def unit(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if m not in g:
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_imports_only_go_down_the_layers():
    bad = []
    for mod, deps in graph().items():
        u = unit(mod)
        if u == "__init__":
            continue
        assert u in LAYER, f"{mod}: add its unit {u!r} to LAYERS in tests/test_layers.py"
        for d in deps:
            du = unit(d)
            if du != u and du != "__init__" and LAYER[du] >= LAYER[u]:
                bad.append(f"{mod} imports {d} (layer {LAYER[u]} -> {LAYER[du]})")
    assert not bad, "\n".join(bad)


def test_the_check_catches_a_cycle_and_an_upward_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert "framecast.generate" in imports(PKG / "stream" / "session.py")  # function-local imports count too


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        if len(body) == 1:
            return 0
        first = body[1]
    return node.end_lineno - first.lineno + 1


def test_files_and_functions_stay_small():
    long_files, long_funcs = [], []
    for path in sorted(PKG.rglob("*.py")):
        lines = path.read_text().splitlines()
        if len(lines) > MAX_FILE_LINES and not any(LONG_OK in ln for ln in lines[:3]):
            long_files.append(f"{path.relative_to(PKG)}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _body_lines(node) > MAX_FUNCTION_LINES:
                near = lines[max(node.lineno - 2, 0): node.lineno]
                if not any(LONG_OK in ln for ln in near):
                    long_funcs.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name}: {_body_lines(node)} lines")
    assert not long_files, long_files
    assert not long_funcs, long_funcs


def test_code_cites_only_documents_in_the_repository():
    """Comments cite docs/method.md, docs/architecture.md or a paper, never a file outside the repository."""
    root = PKG.parent
    # the old citation forms, spelled in pieces so that this file does not match its own search
    needles = tuple(a + b for a, b in (("spec", " §"), ("design", " §"), ("aesthetics", " §"), ("research", "/"),
                                        ("shared", "/")))
    found = [f"{p.relative_to(root)}:{i + 1}" for d in ("framecast", "tests", "benchmarks") for p in (root / d).rglob("*.py")
             if p != Path(__file__) for i, ln in enumerate(p.read_text().splitlines()) if any(n in ln for n in needles)]
    assert not found, found
    for doc in ("method.md", "architecture.md"):
        assert (root / "docs" / doc).is_file() and f"docs/{doc}" in (root / "README.md").read_text()


if __name__ == "__main__":
    for mod, deps in graph().items():
        print(mod, "->", ", ".join(sorted(deps)))
    sys.exit(0)
