#!/usr/bin/env python3
"""Fails when the runtime's top-level modules import each other in a cycle.

Each top-level module of runtime/src (a file `name.rs` or a folder `name/`) is a node; an
edge a -> b is any `crate::b` path written in a's files (a `use` or a qualified name),
comments and string literals aside. The design keeps these layered (vocabulary at the
bottom, the CLI at the top: ../shared/DESIGN.md), so any cycle is an error. `main.rs` and
`lib.rs` are the roots and are left out.

Usage: scripts/check-module-cycles.py [runtime/src]
"""

import re
import sys
from pathlib import Path

ROOTS = {"lib", "main"}


def strip(text: str) -> str:
    """Removes comments and string literals, so `crate::x` in prose is not an import."""
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'r#*"(?:.|\n)*?"#*', '""', text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return text


def modules(src: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for path in sorted(src.iterdir()):
        if path.is_file() and path.suffix == ".rs" and path.stem not in ROOTS:
            found.setdefault(path.stem, []).append(path)
        elif path.is_dir():
            found.setdefault(path.name, []).extend(sorted(path.rglob("*.rs")))
    return found


def graph(src: Path) -> dict[str, set[str]]:
    mods = modules(src)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, files in mods.items():
        for f in files:
            text = strip(f.read_text())
            # `crate::x` paths, and the braces of `use crate::{x, y::z}`.
            for m in re.finditer(r"\bcrate::(\{[^}]*\}|\w+)", text):
                group = m.group(1)
                targets = re.findall(r"(?:^|[{,]\s*)(\w+)", group) if group.startswith("{") else [group]
                for t in targets:
                    if t in mods and t != name:
                        edges[name].add(t)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "runtime/src")
    edges = graph(src)
    found = cycles(edges)
    if not found:
        return 0
    print(f"import cycles between the modules of {src}:", file=sys.stderr)
    for component in found:
        members = set(component)
        print(f"  cycle: {', '.join(component)}", file=sys.stderr)
        for a in component:
            inside = sorted(edges[a] & members)
            print(f"    {a} imports {', '.join(inside)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
