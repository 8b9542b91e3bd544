"""Reading weights: torchvision-format detector checkpoints and ImageNet ResNet checkpoints.

Every file is read with ``torch.load(weights_only=True)``: a checkpoint is data and must never be
able to run code. A path, a ``file://`` URL or an http(s) URL (through torch.hub's cache) is accepted.
"""
import os
import re
from collections import OrderedDict

import torch
from torch import nn


class WeightsError(ValueError):
    """A weights file that cannot be read, or does not fit the model; the message names the file."""


def read_state_dict(source: str | os.PathLike, *, key: str = "model") -> "OrderedDict[str, torch.Tensor]":
    """A state_dict from a file or URL: a bare state_dict, or a dict holding one under ``key``."""
    source = os.fspath(source)
    try:
        if re.match(r"^(https?|file)://", source):
            obj = torch.hub.load_state_dict_from_url(source, map_location="cpu", weights_only=True, progress=False)
        else:
            if not os.path.isfile(source):
                raise FileNotFoundError(f"weights file not found: {source}")
            obj = torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # an unpickling refusal, a corrupt zip, a network error: say which file
        raise WeightsError(f"cannot read weights from {source}: {type(e).__name__}: {e}") from e
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
        obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{source} holds no state_dict (expected a dict of tensors, or one under '{key}')")
    return OrderedDict(obj)


def upgrade_legacy_keys(state_dict: dict) -> "OrderedDict[str, torch.Tensor]":
    """Rename keys of torchvision checkpoints written before 0.13 (its published COCO weights):
    FPN convs ``inner_blocks.0.weight`` -> ``inner_blocks.0.0.weight`` (also layer_blocks), and the RPN's
    ``rpn.head.conv.weight`` -> ``rpn.head.conv.0.0.weight``."""
    out = OrderedDict()
    for k, v in state_dict.items():
        k = re.sub(r"(fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$", r"\1.0.\2", k)
        k = re.sub(r"(rpn\.head\.conv)\.(weight|bias)$", r"\1.0.0.\2", k)
        out[k] = v
    return out


def check_compatible(model: nn.Module, state_dict: dict, source: str, *, ignore: tuple[str, ...] = ()) -> None:
    """Raise one clear error listing missing keys, unexpected keys and shape mismatches."""
    expected = model.state_dict()
    ignored = lambda k: any(k.endswith(s) for s in ignore)  # noqa: E731
    missing = [k for k in expected if k not in state_dict and not ignored(k)]
    unexpected = [k for k in state_dict if k not in expected and not ignored(k)]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return

    def listing(title, items):
        head = "\n    ".join(items[:20])
        more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
        return f"\n  {title} ({len(items)}):\n    {head}{more}" if items else ""

    raise WeightsError(f"the weights in {source} do not fit this model ({type(model).__name__})"
                     + listing("missing from the checkpoint", missing)
                     + listing("unexpected in the checkpoint", unexpected)
                     + listing("shape mismatch", shapes))


def load_detector_weights(model: nn.Module, source: str | os.PathLike, *, state_dict: dict | None = None) -> None:
    """Load a torchvision-format detector checkpoint into ``model``, strictly (``state_dict``: the
    file's contents when the caller has read them already)."""
    if state_dict is None:
        state_dict = read_state_dict(source)
    state_dict = upgrade_legacy_keys(state_dict)
    # BatchNorm's step counter has no FrozenBatchNorm counterpart; it is dropped on load.
    state_dict = OrderedDict((k, v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")
                             or k in model.state_dict())
    check_compatible(model, state_dict, os.fspath(source))
    model.load_state_dict(state_dict, strict=True)


def load_backbone_weights(modules: dict[str, nn.Module], source: str | os.PathLike) -> None:
    """Load an ImageNet ResNet checkpoint (conv1, bn1, layer1..4, fc) into the parts of a detector
    that hold those layers. ``modules`` maps a key prefix of the checkpoint to the module receiving
    the keys that start with it (the module names them the same way, e.g. a head holding "layer4.");
    the module under "" receives the rest. The classifier (fc) is not part of a detector and is
    skipped; everything else must fit exactly."""
    src = os.fspath(source)
    rest = OrderedDict((k, v) for k, v in read_state_dict(source).items()
                       if not k.startswith("fc.") and not k.endswith("num_batches_tracked"))
    parts = {}
    for prefix in [p for p in modules if p]:
        parts[prefix] = OrderedDict((k, v) for k, v in rest.items() if k.startswith(prefix))
        rest = OrderedDict((k, v) for k, v in rest.items() if not k.startswith(prefix))
    parts[""] = rest
    for prefix, module in modules.items():
        check_compatible(module, parts[prefix], src, ignore=("num_batches_tracked",))
        module.load_state_dict(parts[prefix], strict=False)  # strict but for BatchNorm's step counters
