"""docs/bad-input.md cannot rot: every row of its tables names at least one test, and every test
it names exists (a test function pytest collects, in the file named)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bad-input.md"
NODE_ID = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _table_rows(text: str) -> list[str]:
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [
        r
        for r in rows
        if not re.fullmatch(r"\|[\s\-|]+\|", r)
        and not r.startswith("| what is wrong")
        and not r.startswith("| subcommand:")
    ]


def _collected_tests(path: Path) -> set[str]:
    """Names pytest collects from a test file: top-level ``test_*`` functions and ``test_*`` methods of
    ``Test*`` classes (as ``Class::method``)."""
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names |= {
                f"{node.name}::{m.name}"
                for m in node.body
                if isinstance(m, ast.FunctionDef) and m.name.startswith("test")
            }
    return names


def test_every_row_names_a_test_and_every_named_test_exists():
    rows = _table_rows(DOC.read_text())
    assert len(rows) > 50
    untested = [r for r in rows if not NODE_ID.search(r)]
    assert not untested, f"rows without a test: {untested}"
    missing, cache = [], {}
    for row in rows:
        for file, name in NODE_ID.findall(row):
            path = ROOT / file
            if not (path.is_file() and path.name.startswith("test_")):
                missing.append(f"{file}::{name} (no such test file)")
                continue
            if file not in cache:
                cache[file] = _collected_tests(path)
            if name not in cache[file]:
                missing.append(f"{file}::{name}")
    assert not missing, f"named in docs/bad-input.md but not found: {missing}"
