"""What a reader found wrong with its input: fatal errors and the problems it skipped or fixed.

Two outcomes exist for bad input, never a third (silence):

* ``DataError``: the input cannot be used as it is (malformed json/XML, duplicate ids, a file_name
  that escapes the image root, a missing or corrupt image when ``on_bad_image="error"``). The message
  names the file, the record and the field.
* A ``Problem`` in the dataset's ``Report``: something was skipped (an annotation with a bad box or an
  unknown category, an unreadable image with ``on_bad_image="skip"``) or fixed (a box clipped to the
  image). Each problem names the file, the record and the field, and the report counts them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

SKIPPED_IMAGE = "skipped image"
SKIPPED_ANNOTATION = "skipped annotation"
FIXED = "fixed"


class DataError(ValueError):
    """Bad input that cannot be skipped. The message names the file, the record and the field."""


def where(file, record: str | None = None, field_name: str | None = None) -> str:
    """``file: record: field`` -- the prefix of every message about a piece of input."""
    parts = [str(file)]
    if record:
        parts.append(record)
    if field_name:
        parts.append(field_name)
    return ": ".join(parts)


@dataclass(frozen=True)
class Problem:
    """One skipped or fixed piece of input.

    ``action`` is one of ``SKIPPED_IMAGE``, ``SKIPPED_ANNOTATION``, ``FIXED``; ``kind`` is a short
    stable category used for counting (e.g. ``"zero-size box"``); ``detail`` says what was found.
    """

    action: str
    kind: str
    file: str
    record: str
    field: str
    detail: str

    def __str__(self) -> str:
        return f"{where(self.file, self.record, self.field)}: {self.detail} ({self.action}: {self.kind})"


@dataclass
class Report:
    """Every problem a reader skipped or fixed, with counts. ``print(report)`` lists them all."""

    source: str = ""
    problems: list[Problem] = field(default_factory=list)

    def add(self, action: str, kind: str, file, record: str, field_name: str, detail: str) -> None:
        if action not in (SKIPPED_IMAGE, SKIPPED_ANNOTATION, FIXED):
            raise ValueError(f"unknown report action {action!r}")
        self.problems.append(Problem(action, kind, str(file), record, field_name, detail))

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self):
        return iter(self.problems)

    def count(self, action: str | None = None, kind: str | None = None) -> int:
        return sum(
            1 for p in self.problems if (action is None or p.action == action) and (kind is None or p.kind == kind)
        )

    def counts(self) -> dict[tuple[str, str], int]:
        """``{(action, kind): n}`` in first-seen order."""
        return dict(Counter((p.action, p.kind) for p in self.problems))

    def summary(self) -> str:
        """One line, for a training log: ``"<source>: 3 problems: 2 skipped annotation ..."``."""
        if not self.problems:
            return f"{self.source}: no problems"
        per_action = Counter(p.action for p in self.problems)
        kinds = ", ".join(f"{kind}: {n}" for (_, kind), n in self.counts().items())
        actions = ", ".join(f"{n} {action}" for action, n in per_action.items())
        n = len(self.problems)
        return f"{self.source}: {n} problem{'' if n == 1 else 's'}: {actions} ({kinds})"

    def __str__(self) -> str:
        lines = [self.summary()]
        if self.problems:
            rows = [(action, kind, str(n)) for (action, kind), n in self.counts().items()]
            lines.append(format_table(("action", "kind", "count"), rows))
            lines.append("problems:")
            lines.extend(f"  {p}" for p in self.problems)
        return "\n".join(lines)


def format_table(header: tuple[str, ...], rows: Sequence[tuple[object, ...]]) -> str:
    """A plain text table: numeric columns right-aligned, text columns left-aligned."""
    table = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    ncols = len(header)
    widths = [max(len(r[i]) for r in table) for i in range(ncols)]
    numeric = [
        all(r[i].lstrip("-").replace(".", "", 1).isdigit() or r[i] == "" for r in table[1:]) for i in range(ncols)
    ]

    def fmt(row):
        cells = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(table[0]), rule] + [fmt(r) for r in table[1:]])
