"""Count import cycles among lmms-quant's modules (a developer tool, not installed).

    python tools/import_cycles.py [REPO_ROOT]

Every import anywhere in a module counts (relative imports resolved; ``from . import sub`` imports
the submodule ``sub``); a cycle is a strongly connected group of two or more modules.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LAYOUT = (("lmms_quant", "lmms_quant"), ("model_wrappers", "lmms_quant.model_wrappers"), ("tasks", "lmms_quant.tasks"), ("tools", "tools"))


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for folder, pkg in LAYOUT:
        for path in (root / folder).rglob("*.py"):
            parts = [pkg, *path.relative_to(root / folder).with_suffix("").parts]
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([target] if target else []))
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            candidates = subs if len(subs) == len(node.names) else [target, *subs]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        deps.update(c for c in candidates if c in known and c != name)
    return deps


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of two or more modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
    known = modules(root)
    groups = cycles({name: imports_of(name, path, known) for name, path in known.items()})
    print(f"{len(groups)} import cycle(s) among {len(known)} modules")
    for group in groups:
        print("   " + " <-> ".join(group))


if __name__ == "__main__":
    main()
