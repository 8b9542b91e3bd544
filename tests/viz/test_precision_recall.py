import numpy as np

from fasterrcnn.evaluation import evaluate_voc
from fasterrcnn.viz.precision_recall import plot_precision_recall

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_precision_recall_writes_png(tmp_path):
    curves = {
        "cat": (np.array([0.2, 0.5, 0.5, 1.0]), np.array([1.0, 1.0, 0.67, 0.8])),
        "dog": (np.linspace(0, 1, 101), np.linspace(1, 0, 101)),
    }
    path = plot_precision_recall(curves, tmp_path / "plots" / "pr.png", title="test")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_from_voc_metrics_and_empty(tmp_path):
    import torch

    det = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.9])}
    gt = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])}
    m = evaluate_voc([det], [gt], num_classes=2, class_names=["a", "b"])
    assert list(m.curves) == ["a"]
    assert plot_precision_recall(m.curves, tmp_path / "voc.png").read_bytes()[:8] == PNG_SIGNATURE
    assert plot_precision_recall({}, tmp_path / "empty.png").read_bytes()[:8] == PNG_SIGNATURE


def test_plot_from_coco_metrics(tmp_path):
    from fasterrcnn.evaluation import CocoEvaluator
    from tests.evaluation.test_coco import LABEL_TO_CAT, coco_from, gt_dataset, make_detections

    ev = CocoEvaluator(coco_from(gt_dataset()), LABEL_TO_CAT)
    dets = make_detections()
    ev.update(list(dets), list(dets.values()))
    curves = ev.evaluate().curves
    assert set(curves) == {"cat", "dog", "bird"}
    assert plot_precision_recall(curves, tmp_path / "coco.png").read_bytes()[:8] == PNG_SIGNATURE
