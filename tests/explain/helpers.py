"""An image with its ground truth and tiny models, for the tests of `explain` (engine, viz, CLI)."""

from pathlib import Path

import torch
from torch import nn

from fasterrcnn.data import CocoDetection, generate
from fasterrcnn.model import AnchorGenerator, FasterRCNN, SingleMapRoIPooler
from tests.model.helpers import tiny_model

# 96x120 images: the tiny models resize them to 128x160 (scale 4/3), so the way back to the original
# pixels is exercised too
SYNTH = dict(num_train=1, num_val=3, image_size=(96, 120), seed=5, empty_fraction=0.0, min_object_size=16, workers=1)
CLASSES = ["__background__", "circle", "square", "triangle", "star"]


def synth_example(root: Path):
    """-> (paths, image path, image [3, H, W], target in the image's pixels): the first val image with objects."""
    paths = generate(root, **SYNTH)
    data = CocoDetection(paths.val_json)
    index = next(i for i in range(len(data)) if len(data.records[i].boxes) >= 2)
    image, target = data[index]
    return paths, Path(data.records[index].path), image, {"boxes": target["boxes"], "labels": target["labels"]}


def explain_model(**overrides) -> torch.nn.Module:
    """The tiny R18-FPN of the model tests; with random weights the RPN's scores sit near 0.5, so the
    score threshold of 0 lets proposals through and the box head's near-uniform scores pass 0.05."""
    torch.manual_seed(0)
    return tiny_model(num_classes=len(CLASSES), **overrides).eval()


class _TinySingleMap(nn.Module):
    """Two strided convs: one map at stride 16 (a stand-in for ResNet's C4)."""

    out_channels = 16

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), nn.ReLU(), nn.Conv2d(16, 16, 4, stride=4))

    def forward(self, x):
        return self.body(x)


def single_map_model(op: str = "roi_pool") -> torch.nn.Module:
    """The single-map layout of the c4/c5 builders (9 anchors on one map, a single-map pooler), tiny."""
    torch.manual_seed(0)
    return FasterRCNN(
        _TinySingleMap(),
        len(CLASSES),
        min_size=128,
        max_size=192,
        rpn_anchor_generator=AnchorGenerator(((32, 64, 128),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=SingleMapRoIPooler("0", 7, op=op),
        representation_size=32,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=30,
    ).eval()
