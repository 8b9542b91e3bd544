"""The exportable graph (fasterrcnn/deploy/graph.py) in eager mode: the eager model's detections, the eager
transform's sizes, its scripted ops against the package's ops, and the models and options it refuses."""

import pytest
import torch
import torch.nn.functional as F

from fasterrcnn.deploy import ExportError, export
from fasterrcnn.deploy.export import prepare_graph
from fasterrcnn.deploy.graph_ops import group_nms_script, roi_align_script
from fasterrcnn.deploy.resize import EagerResize
from fasterrcnn.model.builders import fasterrcnn_resnet18_c4
from fasterrcnn.model.transform import resized_size as eager_resized_size
from fasterrcnn.ops import batched_nms, roi_align

from .helpers import SIZES, assert_same_detections, decisive_model, graph_results, images


@pytest.fixture(scope="module")
def model():
    return decisive_model()


@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("batch", [1, 2])
def test_the_graph_gives_the_eager_models_detections(model, size, batch):
    graph = prepare_graph(model, input_dtype="float32")
    ims = images(size, count=2)
    with torch.no_grad():
        eager = model(ims)
        found = [d for i in range(0, 2, batch) for d in graph_results(graph(torch.stack(ims[i : i + batch])))]
    assert_same_detections(eager, found, share=1.0)


def test_the_uint8_graph_reads_pixels_as_the_eager_model_reads_them_divided_by_255(model):
    ims = images((80, 100))
    pixels = torch.stack([(im * 255).round().to(torch.uint8) for im in ims])
    with torch.no_grad():
        from_uint8 = graph_results(prepare_graph(model, input_dtype="uint8")(pixels))
        eager = model(ims)
    assert_same_detections(eager, from_uint8, share=1.0)


@pytest.mark.parametrize("min_size,max_size", [(800, 1333), (256, 320), (96, 128)])
def test_the_resize_sizes_are_the_eager_transforms_to_the_pixel(min_size, max_size):
    """Double rounding makes the eager size one less than the exact one for some sizes (97 at 800 -> 799,
    196x245 at 256/320 -> 255x320): the graph's integer emulation gives the eager size on every one."""
    resize = EagerResize(min_size, max_size, 32)
    sizes = [(h, w) for h in range(1, 400, 2) for w in (h, h + 1, h * 5 // 4, h * 4 // 3, h * 3 // 2, 2 * h, 401)]
    sizes += [(97, 130), (196, 245), (427, 640), (480, 640), (1333, 800), (3000, 4500), (1, 4000), (4000, 1)]
    found = [tuple(int(v) for v in resize.sizes(h, w)) for h, w in sizes]
    expected = []
    for h, w in sizes:
        scale = min(min_size / min(h, w), max_size / max(h, w))
        expected.append(eager_resized_size(h, w, scale))
    wrong = [(hw, f, e) for hw, f, e in zip(sizes, found, expected) if f != e]
    assert not wrong, wrong[:5]
    # the cases the exact arithmetic gets wrong are there: the test would fail without the correction
    exact = [(min(h * min_size // min(h, w), h * max_size // max(h, w)),) for h, w in sizes]
    assert sum(e[0] != x[0] for e, x in zip(expected, exact)) > 0


@pytest.mark.parametrize("size", [(97, 130), (196, 245), (60, 50), (33, 200)])
def test_the_resize_samples_as_interpolate_then_pads_with_zeros(size):
    resize = EagerResize(256, 320, 32)
    x = torch.rand(2, 3, *size)
    canvas, h, w = resize(x)
    expected = F.interpolate(x, size=(int(h), int(w)), mode="bilinear", align_corners=False)
    assert canvas.shape[2] % 32 == 0 and canvas.shape[3] % 32 == 0
    torch.testing.assert_close(canvas[:, :, : int(h), : int(w)], expected, atol=1e-5, rtol=1e-5)  # last bits: FMA
    assert not canvas[:, :, int(h) :].any() and not canvas[:, :, :, int(w) :].any()


def test_an_image_with_nothing_above_the_threshold_gives_an_empty_table(model):
    graph = prepare_graph(model, input_dtype="float32", score_threshold=0.999)
    with torch.no_grad():
        boxes, scores, labels, counts = graph(torch.full((2, 3, 64, 80), 0.5))
    assert counts.tolist() == [0, 0]
    assert boxes.shape == (2, graph.detections_per_img, 4) and not boxes.any() and not scores.any()
    assert labels.dtype == torch.int64 and not labels.any()


def test_scripted_nms_keeps_what_batched_nms_keeps():
    g = torch.Generator().manual_seed(1)
    groups, n = 4, 60
    xy = torch.rand(groups, n, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(groups, n, 2, generator=g) * 30], dim=2)
    scores = torch.rand(groups, n, generator=g)
    scores[1] = -1.0  # a group without candidates
    scores[2, ::3] = -1.0  # some boxes that are not candidates
    for threshold, top in ((0.5, 100), (0.3, 100), (0.7, 5)):
        kept = group_nms_script(boxes, scores, threshold, top)
        for group in range(groups):
            index = torch.nonzero(scores[group] >= 0).flatten()
            expected = index[batched_nms(boxes[group, index], scores[group, index], torch.zeros_like(index), threshold)]
            mine = kept[kept[:, 0] == group, 1]
            assert mine.tolist() == expected[:top].tolist(), (group, threshold)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.25, 0.0625])
def test_scripted_roi_align_equals_the_packages_roi_align(aligned, scale):
    g = torch.Generator().manual_seed(2)
    feature = torch.randn(2, 5, 13, 17, generator=g)
    xy = torch.rand(30, 2, generator=g) * torch.tensor([17.0, 13.0]) / scale * 1.2 - 4
    rois = torch.cat(
        [torch.randint(0, 2, (30, 1), generator=g).float(), xy, xy + torch.rand(30, 2, generator=g) * 12 / scale], dim=1
    )
    expected = roi_align(feature, rois, (7, 6), scale, 2, aligned)
    torch.testing.assert_close(roi_align_script(feature, rois, scale, 7, 6, 2, aligned), expected, atol=1e-5, rtol=1e-5)


def test_what_export_refuses_is_named(model, tmp_path):
    with pytest.raises(ExportError, match="expected a fasterrcnn FasterRCNN"):
        export(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    with pytest.raises(ExportError, match="format must be one of"):
        export(model, tmp_path / "x.tflite", format="tflite")
    with pytest.raises(ExportError, match="input_dtype must be one of"):
        export(model, tmp_path / "x.onnx", input_dtype="float16")
    with pytest.raises(ExportError, match="3 names for a model of 5 classes"):
        export(model, tmp_path / "x.onnx", class_names=["__background__", "a", "b"])
    fast = decisive_model().optimize_for_inference()
    with pytest.raises(ExportError, match="optimize_for_inference"):
        export(fast, tmp_path / "x.onnx")
    roi_pool_model = fasterrcnn_resnet18_c4(num_classes=3, roi_op="roi_pool", min_size=64, max_size=96).eval()
    with pytest.raises(ExportError, match="TorchScript export covers RoIAlign"):
        export(roi_pool_model, tmp_path / "x.torchscript", format="torchscript")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("size", [(64, 96), (50, 74)], ids=["2x", "not-2x"])
def test_the_exported_fpn_form_equals_the_eager_fpn(size):
    """The graph's FPN upsamples then adds (ONNX Resize + Add); the eager one adds through a broadcast view."""
    from collections import OrderedDict

    from fasterrcnn.deploy.graph import interpolating_fpns
    from fasterrcnn.model.fpn import FeaturePyramidNetwork

    torch.manual_seed(0)
    fpn = FeaturePyramidNetwork([8, 16, 32], 12).eval()
    h, w = size
    x = OrderedDict((str(i), torch.randn(2, c, -(-h // 2**i), -(-w // 2**i))) for i, c in enumerate([8, 16, 32]))
    with torch.no_grad():
        eager = fpn(x)
        assert interpolating_fpns(fpn) == 1 and type(fpn).__name__ == "_InterpolatingFPN"
        exported = fpn(x)
    assert list(eager) == list(exported) == ["0", "1", "2", "pool"]
    for name in eager:
        torch.testing.assert_close(exported[name], eager[name], rtol=0, atol=1e-6)


def test_the_pooled_rows_come_back_in_the_rois_order(model):
    """The graph pools level by level, concatenates and gathers the rows back: equal to the eager pooler."""
    graph = prepare_graph(model)
    torch.manual_seed(1)
    maps = [torch.randn(1, 16, 96 // s, 128 // s) for s in (4, 8, 16, 32)]
    xy = torch.rand(40, 2) * torch.tensor([100.0, 70.0])
    wh = torch.rand(40, 2) * torch.tensor([120.0, 90.0]) + 2  # sizes across the levels
    rois = torch.cat([torch.zeros(40, 1), xy, xy + wh], dim=1)
    pooled = graph.pool(maps, rois)
    pooler = model.roi_heads.box_roi_pool
    names = ["0", "1", "2", "3"]
    with torch.no_grad():
        eager = pooler(dict(zip(names, maps)), [rois[:, 1:]], [(96, 128)])
    torch.testing.assert_close(pooled, eager, rtol=1e-5, atol=1e-5)
