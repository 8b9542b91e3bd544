"""The error-analysis figures (fasterrcnn.viz.confusion) write PNGs of a sensible size for few and many classes."""

import numpy as np
import pytest
from PIL import Image

from fasterrcnn.evaluation.confusion import ConfusionMatrix, F1Curve
from fasterrcnn.viz.confusion import plot_confusion_matrix, plot_f1_curve


def model_names(num_classes):
    return ["__background__", *(f"class {k}" for k in range(1, num_classes + 1))]


def random_matrix(num_classes, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 40, size=(num_classes + 1, num_classes + 1)).astype(np.int64)
    counts[np.arange(num_classes), np.arange(num_classes)] += 200  # mostly right, as a trained model
    counts[-1, -1] = 0
    counts[0, 1] = 0  # a zero cell, left blank
    names = model_names(num_classes)[1:] + ["background"]
    return ConfusionMatrix(counts=counts, class_names=names, iou_threshold=0.5, score_threshold=0.4)


def synthetic_curve(num_classes):
    thresholds = np.linspace(0, 1, 101)
    peaks = np.linspace(0.3, 0.7, num_classes)
    per_class = np.clip(0.9 - 2.0 * (thresholds[None, :] - peaks[:, None]) ** 2, 0, 1)
    per_class[-1] = np.nan  # a class without ground truth: no line
    f1 = np.nanmean(per_class, axis=0)
    best = int(np.argmax(f1))
    return F1Curve(
        thresholds=thresholds,
        precision=np.linspace(0.5, 1, 101),
        recall=np.linspace(1, 0, 101),
        f1=f1,
        per_class_f1=per_class,
        best_threshold=float(thresholds[best]),
        best_f1=float(f1[best]),
    )


def assert_sensible_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        width, height = im.size
    assert 400 <= width <= 2500 and 300 <= height <= 2500, im.size


@pytest.mark.parametrize("num_classes", [2, 12])
def test_plot_confusion_matrix(tmp_path, num_classes):
    cm = random_matrix(num_classes)
    path = plot_confusion_matrix(cm, tmp_path / "figs" / "confusion.png")
    assert_sensible_png(path)
    assert_sensible_png(plot_confusion_matrix(cm, tmp_path / "counts.png", normalized=False, title="counts"))


@pytest.mark.parametrize("num_classes", [2, 12])
def test_plot_f1_curve(tmp_path, num_classes):
    curve = synthetic_curve(num_classes)
    path = plot_f1_curve(curve, model_names(num_classes), tmp_path / "figs" / "f1.png")
    assert_sensible_png(path)


def test_plot_f1_curve_names_without_background_and_long_legend(tmp_path):
    curve = synthetic_curve(25)  # 24 classes with a line: 20 in the legend and "+4 more"
    assert_sensible_png(plot_f1_curve(curve, model_names(25)[1:], tmp_path / "f1.png", title="many"))
    with pytest.raises(ValueError, match="class_names has 3 names"):
        plot_f1_curve(curve, ["a", "b", "c"], tmp_path / "bad.png")
