"""torchvision's backbone helpers, call for call: the tutorial snippet, returned layers, extra FPN levels."""

import pytest
import torch

from fasterrcnn.model import FasterRCNN, FrozenBatchNorm2d, LastLevelP6P7, resnet_fpn_backbone
from fasterrcnn.model.resnet import ResNetBody


def test_the_tutorial_snippet_runs_with_only_the_import_changed():
    # https://pytorch.org/vision tutorials: a ResNet-50-FPN backbone into FasterRCNN, a training step
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None)
    model = FasterRCNN(backbone, num_classes=2)  # background + target class
    model.train()
    images = [torch.rand(3, 300, 300)]
    targets = [{"boxes": torch.tensor([[10, 20, 100, 200]], dtype=torch.float32), "labels": torch.tensor([1])}]
    loss_dict = model(images, targets)  # loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg
    assert set(loss_dict) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in loss_dict.values())


def test_defaults_are_torchvisions():
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None)
    assert isinstance(backbone.body.bn1, FrozenBatchNorm2d)
    trained = {k.split(".")[0] for k, p in backbone.body.named_parameters() if p.requires_grad}
    assert trained == {"layer2", "layer3", "layer4"}  # trainable_layers=3
    with torch.no_grad():
        out = backbone(torch.rand(1, 3, 128, 160))
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {
        "0": (256, 32, 40),
        "1": (256, 16, 20),
        "2": (256, 8, 10),
        "3": (256, 4, 5),
        "pool": (256, 2, 3),
    }
    with pytest.raises(ValueError, match="backbone_name must be one of"):
        resnet_fpn_backbone(backbone_name="resnet77", weights=None)


def test_returned_layers_and_p6p7():
    backbone = resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, returned_layers=[2, 3], extra_blocks=LastLevelP6P7(256, 256)
    )
    assert not hasattr(backbone.body, "layer4")  # the body stops at the last returned stage, as torchvision's
    with torch.no_grad():
        out = backbone(torch.rand(1, 3, 128, 160))
    assert {k: tuple(v.shape[2:]) for k, v in out.items()} == {
        "0": (16, 20),
        "1": (8, 10),
        "p6": (4, 5),
        "p7": (2, 3),
    }
    p6_from_c = resnet_fpn_backbone(backbone_name="resnet18", weights=None, extra_blocks=LastLevelP6P7(512, 256))
    assert p6_from_c.fpn.extra_blocks.p6.weight.shape == (256, 512, 3, 3)  # P6 from C5 when channels differ


def test_imagenet_weights_load_also_into_a_shorter_body(tmp_path):
    torch.manual_seed(0)
    full = ResNetBody(18)
    state = {**full.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save(state, tmp_path / "resnet18.pth")
    backbone = resnet_fpn_backbone(
        backbone_name="resnet18", weights=str(tmp_path / "resnet18.pth"), returned_layers=[1, 2]
    )
    assert torch.equal(backbone.body.layer2[0].conv1.weight, full.layer2[0].conv1.weight)
    assert torch.equal(backbone.body.bn1.running_var, full.bn1.running_var)
