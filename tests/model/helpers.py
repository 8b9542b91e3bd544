"""Small models and inputs for fast model tests (two CPU cores)."""

import torch

from fasterrcnn.model import fasterrcnn_resnet18_fpn


def tiny_model(num_classes: int = 4, **overrides):
    options = dict(
        num_classes=num_classes,
        fpn_channels=32,
        min_size=128,
        max_size=192,
        representation_size=64,
        rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50,
        box_batch_size_per_image=32,
        rpn_batch_size_per_image=64,
    )
    options.update(overrides)
    return fasterrcnn_resnet18_fpn(**options)


def sample_batch(num_classes: int = 4, sizes=((120, 160), (100, 130))):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    targets = []
    for h, w in sizes:
        targets.append(
            {
                "boxes": torch.tensor([[10.0, 15.0, 60.0, 70.0], [40.0, 30.0, 100.0, 90.0]]).clamp(max=min(h, w) - 1),
                "labels": torch.tensor([1, num_classes - 1]),
            }
        )
    return images, targets
