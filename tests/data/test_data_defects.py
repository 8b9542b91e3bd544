"""Issue 20, data side: degenerate image sizes, duplicate category names, a VOC folder as COCO, the
check-data progress when not on a terminal, and the COCO loading time against json.load."""

import io
import json
import time

import pytest

from fasterrcnn.data import DataError, check_dataset
from fasterrcnn.data.base import progress_lines
from fasterrcnn.data.coco import CocoDetection
from fasterrcnn.data.images import DEGENERATE_SIZE, degenerate_size
from fasterrcnn.data.report import SKIPPED_IMAGE

from .helpers import coco_json, make_image, make_voc, write_json


def _thin_set(tmp_path):
    sizes = {1: (4000, 1), 2: (1, 4000), 3: (2000, 3), 4: (40, 30)}  # width x height
    images, anns = [], []
    for i, (w, h) in sizes.items():
        make_image(tmp_path / "img" / f"{i}.png", width=w, height=h)
        images.append({"id": i, "file_name": f"{i}.png", "width": w, "height": h})
        anns.append(
            {
                "id": i,
                "image_id": i,
                "category_id": 1,
                "bbox": [0, 0, min(w, 5), min(h, 5) or 1],
                "area": 1.0,
                "iscrowd": 0,
            }
        )
    return write_json(tmp_path / "ann.json", coco_json(images, anns)), tmp_path / "img"


def test_degenerate_sizes_are_found_by_check_data_and_skipped_by_the_dataset(tmp_path):
    """#1: a 1x4000 image passed check-data ("no problems") and crashed training at step 0."""
    ann, img = _thin_set(tmp_path)
    check = check_dataset(ann, img)
    assert not check.ok and check.num_images == 1
    assert check.report.count(SKIPPED_IMAGE, DEGENERATE_SIZE) == 3
    text = str(check)
    assert "image id 2: width/height" in text and "1x4000 (width x height): a side under 2 pixels" in text
    assert "2000x3 (width x height): one side is 667 times the other" in text
    ds = CocoDetection(ann, img)  # training's reader (on_bad_image="error"): the same counted skips
    assert len(ds) == 1 and ds.report.count(SKIPPED_IMAGE, DEGENERATE_SIZE) == 3
    image, target = ds[0]
    assert tuple(image.shape) == (3, 30, 40)


@pytest.mark.parametrize(
    "w, h, bad", [(1, 1, True), (1, 50, True), (2, 200, False), (2, 201, True), (640, 480, False), (10000, 99, True)]
)
def test_degenerate_size_rule(w, h, bad):
    assert (degenerate_size(w, h) is not None) == bad
    assert (degenerate_size(h, w) is not None) == bad


def test_duplicate_category_names_are_refused_naming_both_ids(tmp_path):
    ann = write_json(tmp_path / "ann.json", coco_json([], [], [{"id": 3, "name": "cat"}, {"id": 8, "name": "cat"}]))
    with pytest.raises(DataError, match=r"category id 8: name: duplicate category name 'cat', also category id 3"):
        CocoDetection(ann, tmp_path)


def test_a_voc_root_read_as_coco_says_so(tmp_path):
    """#8: data.format=coco on a VOC root said "annotation file not found"."""
    root = make_voc(tmp_path / "v", {"a": [("dog", 1, 1, 10, 10, 0)]})
    with pytest.raises(DataError, match="looks like a Pascal VOC root: set data.format=voc"):
        CocoDetection(root)


def test_report_summary_counts_in_words():
    from fasterrcnn.data.report import SKIPPED_ANNOTATION, Report

    report = Report(source="strings.json")
    report.add(SKIPPED_ANNOTATION, "zero-size box", "strings.json", "annotation id 1", "bbox", "x")
    assert report.summary() == "strings.json: 1 problem: 1 skipped annotation (zero-size box: 1)"


class _Pipe(io.StringIO):
    def isatty(self):
        return False


def test_progress_lines_when_not_a_terminal(monkeypatch):
    """Smaller: check-data printed nothing for over 90 s on 150k images when not on a terminal."""
    clock = iter(range(0, 1000, 3))  # 3 s per image
    monkeypatch.setattr("fasterrcnn.data.base.time.monotonic", lambda: next(clock))
    stream = _Pipe()
    assert list(progress_lines(list(range(10)), "checking images", every_s=10, stream=stream)) == list(range(10))
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("checking images: 4/10 (40%)") and lines[-1].startswith("checking images: 10/10 done")
    assert "\r" not in stream.getvalue()


def _big_coco(path, n_images=150_000, n_boxes=300_000):
    images = [
        {"id": i, "file_name": f"train/img_{i:06d}.jpg", "width": 640, "height": 480} for i in range(1, n_images + 1)
    ]
    anns = [
        {
            "id": j,
            "image_id": 1 + j % n_images,
            "category_id": 1 + j % 3,
            "bbox": [10.5 + j % 7, 20.25, 100.0 + j % 13, 50.0],
            "area": 5000.0,
            "iscrowd": int(j % 50 == 0),
        }
        for j in range(1, n_boxes + 1)
    ]
    anns[5]["bbox"] = [600.0, 400.0, 100.0, 100.0]  # clipped: the slow path still runs where needed
    anns[6]["bbox"] = [1.0, 1.0, 0.0, 5.0]  # zero size: skipped and reported
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def test_loading_a_large_coco_json_takes_at_most_twice_json_load(tmp_path):
    """Smaller: a 47 MB COCO json (150k images, 300k boxes) took 6.8 s to load against 1.1 s for json.load."""
    path = _big_coco(tmp_path / "big.json")

    def timed(fn):
        best = float("inf")
        for _ in range(3):  # best of 3: robust on a busy machine
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    def plain():
        with open(path, encoding="utf-8") as f:
            json.load(f)

    plain()  # warm the page cache
    ds = CocoDetection(path, tmp_path)
    assert len(ds) == 150_000 and sum(len(r.boxes) for r in ds.records) == 300_000 - 6000 - 1
    assert ds.report.count(kind="box clipped to image") == 1 and ds.report.count(kind="zero-size box") == 1
    ours, theirs = timed(lambda: CocoDetection(path, tmp_path)), timed(plain)
    assert ours <= 2 * theirs, f"CocoDetection {ours:.2f} s against json.load {theirs:.2f} s"
