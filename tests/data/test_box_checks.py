import math

import pytest

from fasterrcnn.data.box_checks import (
    CLIPPED,
    NEGATIVE_SIZE,
    NON_FINITE,
    OUTSIDE,
    ZERO_SIZE,
    check_box,
    resolve_inside,
)
from fasterrcnn.data.report import DataError


def test_good_box_passes_unchanged():
    r = check_box(1, 2, 10, 20, 40, 30)
    assert r.box == (1.0, 2.0, 10.0, 20.0) and r.kind is None


@pytest.mark.parametrize(
    "box, kind",
    [
        ((math.nan, 0, 5, 5), NON_FINITE),
        ((0, 0, math.inf, 5), NON_FINITE),
        ((5, 0, 2, 5), NEGATIVE_SIZE),
        ((0, 5, 5, 1), NEGATIVE_SIZE),
        ((3, 0, 3, 5), ZERO_SIZE),
        ((50, 0, 60, 5), OUTSIDE),
        ((-10, -10, 0, 5), OUTSIDE),
        ((0, 30, 5, 35), OUTSIDE),
    ],
)
def test_bad_boxes_are_skipped(box, kind):
    r = check_box(*box, 40, 30)
    assert r.box is None and r.kind == kind and r.detail


def test_partly_outside_box_is_clipped():
    r = check_box(-5, 10, 45, 35, 40, 30)
    assert r.box == (0.0, 10.0, 40.0, 30.0) and r.kind == CLIPPED
    assert "40x30" in r.detail


def test_resolve_inside(tmp_path):
    assert resolve_inside(tmp_path, "a/b.jpg", "ann.json", "image id 1", "file_name") == tmp_path / "a" / "b.jpg"
    assert resolve_inside(tmp_path, "a/../b.jpg", "f", "r", "x") == tmp_path / "b.jpg"
    with pytest.raises(DataError, match=r"ann.json: image id 1: file_name: '\.\./x.jpg' escapes"):
        resolve_inside(tmp_path, "../x.jpg", "ann.json", "image id 1", "file_name")
    with pytest.raises(DataError, match="absolute path"):
        resolve_inside(tmp_path, "/etc/passwd", "ann.json", "image id 1", "file_name")
    with pytest.raises(DataError, match="non-empty string"):
        resolve_inside(tmp_path, None, "ann.json", "image id 1", "file_name")
