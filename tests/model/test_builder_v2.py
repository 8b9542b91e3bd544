"""ResNet-50-FPN v2: its key layout, the RPN head's old and new names, ConvFCHead's old names, a training step."""

import torch

from fasterrcnn import fasterrcnn_resnet50_fpn_v2
from fasterrcnn.model import ConvFCHead, RPNHead


def test_v2_keys_outside_the_trunk():
    with torch.device("meta"):
        model = fasterrcnn_resnet50_fpn_v2(num_classes=91)
    state = model.state_dict()
    heads = [(k, tuple(v.shape)) for k, v in state.items() if k.startswith(("rpn.", "roi_heads."))]
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    expected = [
        ("rpn.head.conv.0.0.weight", (256, 256, 3, 3)),
        ("rpn.head.conv.0.0.bias", (256,)),
        ("rpn.head.conv.1.0.weight", (256, 256, 3, 3)),
        ("rpn.head.conv.1.0.bias", (256,)),
        ("rpn.head.cls_logits.weight", (3, 256, 1, 1)),
        ("rpn.head.cls_logits.bias", (3,)),
        ("rpn.head.bbox_pred.weight", (12, 256, 1, 1)),
        ("rpn.head.bbox_pred.bias", (12,)),
    ]
    for i in range(4):
        expected.append((f"roi_heads.box_head.{i}.0.weight", (256, 256, 3, 3)))
        expected += [(f"roi_heads.box_head.{i}.1.{s}", () if s == "num_batches_tracked" else (256,)) for s in bn]
    expected += [
        ("roi_heads.box_head.5.weight", (1024, 256 * 7 * 7)),
        ("roi_heads.box_head.5.bias", (1024,)),
        ("roi_heads.box_predictor.cls_score.weight", (91, 1024)),
        ("roi_heads.box_predictor.cls_score.bias", (91,)),
        ("roi_heads.box_predictor.bbox_pred.weight", (364, 1024)),
        ("roi_heads.box_predictor.bbox_pred.bias", (364,)),
    ]
    assert heads == expected
    fpn = [k for k in state if k.startswith("backbone.fpn.inner_blocks.0.")]
    assert fpn == ["backbone.fpn.inner_blocks.0.0.weight"] + [f"backbone.fpn.inner_blocks.0.1.{s}" for s in bn]
    assert isinstance(model.backbone.body.bn1, torch.nn.BatchNorm2d)  # BatchNorm, not frozen
    assert len(state) == 404  # as torchvision's (test_torchvision_parity_v2 compares the lists)


def test_rpn_head_loads_its_new_and_its_old_names():
    two = RPNHead(8, 3, conv_depth=2)
    assert [k for k in two.state_dict() if k.startswith("conv.")] == [
        "conv.0.0.weight",
        "conv.0.0.bias",
        "conv.1.0.weight",
        "conv.1.0.bias",
    ]
    fresh = RPNHead(8, 3, conv_depth=2)
    fresh.load_state_dict(two.state_dict())
    assert torch.equal(fresh.conv[1][0].weight, two.conv[1][0].weight)
    one = RPNHead(8, 3)
    old = {k.replace("conv.0.0.", "conv."): v for k, v in RPNHead(8, 3).state_dict().items()}
    assert "conv.weight" in old
    one.load_state_dict(old)
    assert torch.equal(one.conv[0][0].weight, old["conv.weight"])


def test_conv_fc_head_loads_the_names_it_had_before_the_torchvision_layout():
    torch.manual_seed(0)
    head = ConvFCHead(8, (3, 3), (8, 8), 16)
    old = {}
    for k, v in head.state_dict().items():  # 0.0.weight -> convs.0.weight, 0.1.x -> convs.1.x, 3.weight -> fc.weight
        first, rest = k.split(".", 1)
        if first == "3":
            old[f"fc.{rest}"] = v
        else:
            kind, name = rest.split(".", 1)
            old[f"convs.{3 * int(first) + int(kind)}.{name}"] = v
    assert "convs.4.running_mean" in old and "fc.weight" in old
    loaded = ConvFCHead(8, (3, 3), (8, 8), 16)
    loaded.load_state_dict(old)
    for (k, a), b in zip(head.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.rand(5, 8, 3, 3)
    assert torch.equal(head.eval()(x), loaded.eval()(x))


def test_v2_training_step_reaches_every_trainable_parameter():
    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn_v2(num_classes=3, min_size=96, max_size=128).train()
    images = [torch.rand(3, 96, 128), torch.rand(3, 100, 100)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 90.0, 90.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[5.0, 5.0, 60.0, 70.0], [30.0, 40.0, 95.0, 95.0]]), "labels": torch.tensor([2, 1])},
    ]
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(p.requires_grad for p in model.parameters())
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []
