"""The longest functions of some packages, by lines from ``def`` to the last line (decorators left out).

    python scripts/longest_functions.py llava vision_token_compression --top 5 [--exclude llava/serve/cli.py]

Methods are named ``Class.method``; nested functions count on their own and within their parent.
The house aims at 60 lines at most (a reader should see a function whole).
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Sequence
from pathlib import Path


def function_lengths(path: Path) -> list[tuple[int, str, int]]:
    """``(lines, qualified name, first line)`` of every function in one file."""
    rows = []
    stack: list[tuple[ast.AST, str]] = [(ast.parse(path.read_text()), "")]
    while stack:
        node, prefix = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    rows.append((child.end_lineno - child.lineno + 1, name, child.lineno))
                stack.append((child, name + "."))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--exclude", nargs="*", default=[], type=Path, help="files to leave out")
    args = parser.parse_args(argv)
    excluded = {path.resolve() for path in args.exclude}
    for package in args.packages:
        rows = [(lines, name, f"{path}:{line}")
                for path in sorted(package.rglob("*.py")) if path.resolve() not in excluded
                for lines, name, line in function_lengths(path)]
        print(f"== {package}")
        for lines, name, where in sorted(rows, reverse=True)[:args.top]:
            print(f"{lines:4d}  {name}  ({where})")


if __name__ == "__main__":
    main()
