"""Marks the tests listed in tests/slow_tests.txt `slow` (loaded by pyproject's `addopts = "-p tests._markers"`).

The list lives in a text file, not in decorators, so that the measured set can be re-measured and
rewritten in one place. An id without parameters covers every parametrisation of that test. An entry
whose file was collected but which names no collected test is reported (a test was renamed or moved),
so the list cannot silently go stale.
"""

from __future__ import annotations

from pathlib import Path

import pytest

LIST = Path(__file__).with_name("slow_tests.txt")


def read_slow_ids(path: Path = LIST) -> list[str]:
    """The node ids of `path`: one per line, `#` starts a comment, blank lines skipped."""
    ids = []
    for line in path.read_text().splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            ids.append(entry)
    return ids


def covers(entry: str, nodeid: str) -> bool:
    """Whether the listed `entry` names the test `nodeid` (itself, or one of its parametrisations)."""
    return nodeid == entry or nodeid.startswith((entry + "[", entry + "::"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    entries = read_slow_ids()
    used = set()
    for item in items:
        for entry in entries:
            if covers(entry, item.nodeid):
                item.add_marker(pytest.mark.slow)
                used.add(entry)
    collected_files = {item.nodeid.split("::", 1)[0] for item in items}
    stale = [e for e in entries if e not in used and e.split("::", 1)[0] in collected_files]
    if stale:
        config.issue_config_time_warning(
            pytest.PytestConfigWarning(f"{LIST.name} names tests that were not collected: {', '.join(stale)}"),
            stacklevel=2,
        )
