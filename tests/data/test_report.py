import pytest

from fasterrcnn.data.report import FIXED, SKIPPED_ANNOTATION, SKIPPED_IMAGE, Report, format_table


def test_report_counts_and_prints_every_problem():
    r = Report(source="ann.json")
    assert len(r) == 0 and r.summary() == "ann.json: no problems"
    r.add(SKIPPED_ANNOTATION, "zero-size box", "ann.json", "annotation id 3", "bbox", "box [1, 1, 1, 5]")
    r.add(SKIPPED_ANNOTATION, "zero-size box", "ann.json", "annotation id 4", "bbox", "box [2, 2, 2, 5]")
    r.add(FIXED, "box clipped to image", "ann.json", "annotation id 5", "bbox", "clipped")
    r.add(SKIPPED_IMAGE, "missing image", "ann.json", "image id 9", "file_name", "not found: x.jpg")
    assert len(r) == 4
    assert r.count(SKIPPED_ANNOTATION) == 2 and r.count(kind="missing image") == 1
    assert r.counts()[(SKIPPED_ANNOTATION, "zero-size box")] == 2
    assert "4 problems" in r.summary() and "zero-size box: 2" in r.summary()
    text = str(r)
    for needle in (
        "annotation id 3",
        "annotation id 4",
        "annotation id 5",
        "image id 9",
        "x.jpg",
        "ann.json: annotation id 3: bbox: box [1, 1, 1, 5]",
    ):
        assert needle in text


def test_report_rejects_unknown_action():
    with pytest.raises(ValueError):
        Report().add("ignored", "k", "f", "r", "x", "d")


def test_format_table_aligns():
    text = format_table(("class", "n"), [("cat", "3"), ("elephant", "12")])
    lines = text.splitlines()
    assert lines[0] == "class      n"
    assert lines[2] == "cat        3" and lines[3] == "elephant  12"
