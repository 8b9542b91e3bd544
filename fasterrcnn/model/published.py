"""Published weights by name: torchvision's names for its checkpoints ("DEFAULT", "COCO_V1",
"IMAGENET1K_V1", ...) resolved to the URLs it publishes them at, so ``weights="DEFAULT"`` means here
what it means there. The file itself is fetched (once, into torch.hub's cache, its SHA-256 checked
against the prefix in its name) by ``weights.local_weights_file``.

    detector_weights("fasterrcnn_resnet50_fpn", "DEFAULT")   -> ".../fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
    backbone_weights("mobilenet_v3_large", "IMAGENET1K_V1")  -> ".../mobilenet_v3_large-8738ca79.pth"
    detector_weights("fasterrcnn_resnet50_fpn", "my.pth")    -> "my.pth" (a path or URL passes unchanged)
"""

import os
import re

from .weights import WeightsError

_BASE = "https://download.pytorch.org/models/"

# builder -> {weights name: file under _BASE}; "DEFAULT" names the entry torchvision's DEFAULT is
DETECTORS: dict[str, dict[str, str]] = {
    "fasterrcnn_resnet50_fpn": {"COCO_V1": "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth", "DEFAULT": "COCO_V1"},
    "fasterrcnn_resnet50_fpn_v2": {"COCO_V1": "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth", "DEFAULT": "COCO_V1"},
    "fasterrcnn_mobilenet_v3_large_fpn": {
        "COCO_V1": "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth",
        "DEFAULT": "COCO_V1",
    },
    "fasterrcnn_mobilenet_v3_large_320_fpn": {
        "COCO_V1": "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth",
        "DEFAULT": "COCO_V1",
    },
}

# ImageNet classifiers whose trunk a detector's backbone takes
BACKBONES: dict[str, dict[str, str]] = {
    "resnet18": {"IMAGENET1K_V1": "resnet18-f37072fd.pth", "DEFAULT": "IMAGENET1K_V1"},
    "resnet34": {"IMAGENET1K_V1": "resnet34-b627a593.pth", "DEFAULT": "IMAGENET1K_V1"},
    "resnet50": {
        "IMAGENET1K_V1": "resnet50-0676ba61.pth",
        "IMAGENET1K_V2": "resnet50-11ad3fa6.pth",
        "DEFAULT": "IMAGENET1K_V2",
    },
    "resnet101": {
        "IMAGENET1K_V1": "resnet101-63fe2227.pth",
        "IMAGENET1K_V2": "resnet101-cd907fc2.pth",
        "DEFAULT": "IMAGENET1K_V2",
    },
    "mobilenet_v3_large": {
        "IMAGENET1K_V1": "mobilenet_v3_large-8738ca79.pth",
        "IMAGENET1K_V2": "mobilenet_v3_large-5c1a4163.pth",
        "DEFAULT": "IMAGENET1K_V2",
    },
    "mobilenet_v3_small": {"IMAGENET1K_V1": "mobilenet_v3_small-047dcff4.pth", "DEFAULT": "IMAGENET1K_V1"},
}

# A weights name: upper-case letters, digits and underscores (torchvision's enum members), optionally
# written as the enum's string form "<Class>.<NAME>" (e.g. "FasterRCNN_ResNet50_FPN_Weights.COCO_V1").
_NAME = re.compile(r"^(?:\w+_Weights\.)?([A-Z][A-Z0-9_]*)$")


def _resolve(table: dict[str, dict[str, str]], model: str, weights, what: str):
    if weights is None or not isinstance(weights, str):
        return weights
    found = _NAME.match(weights)
    if found is None or os.path.exists(weights):  # a path or a URL
        return weights
    name = found.group(1)
    names = table.get(model, {})
    if name not in names:
        known = ", ".join(sorted(names)) if names else "none"
        raise WeightsError(
            f"{weights!r} is not a published {what} of {model} (names here: {known}); "
            "give one of those, or the path or URL of a checkpoint"
        )
    entry = names[name]
    return _BASE + names[entry] if entry in names else _BASE + entry


def detector_weights(builder: str, weights):
    """The URL of the detector checkpoint ``weights`` names for ``builder`` ("DEFAULT", "COCO_V1"), or
    ``weights`` unchanged when it is not a name (a path, a URL, None)."""
    return _resolve(DETECTORS, builder, weights, "detector checkpoint")


def backbone_weights(backbone: str, weights):
    """The URL of the ImageNet checkpoint ``weights`` names for ``backbone`` ("resnet50",
    "mobilenet_v3_large", ...: "DEFAULT", "IMAGENET1K_V1", ...), or ``weights`` unchanged."""
    return _resolve(BACKBONES, backbone, weights, "backbone checkpoint")
