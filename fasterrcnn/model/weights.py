"""Reading weights: torchvision-format detector checkpoints and ImageNet ResNet checkpoints.

Every file is read with ``torch.load(weights_only=True)``: a checkpoint is data and must never be
able to run code. A path, a ``file://`` URL or an http(s) URL (through torch.hub's cache) is accepted.
"""

import os
import pickle
import re
from collections import OrderedDict
from urllib.parse import unquote, urlparse

import torch
from torch import nn


class WeightsError(ValueError):
    """A weights file that cannot be read, or does not fit the model; the message names the file."""


_URL = re.compile(r"^(https?|file)://")
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")  # torchvision's names: fasterrcnn_resnet50_fpn_coco-258fb6c6.pth


def is_url(source: str | os.PathLike) -> bool:
    return bool(_URL.match(os.fspath(source)))


def local_weights_file(source: str | os.PathLike, *, progress: bool = False) -> str:
    """The local file behind ``source``: a path or ``file://`` URL as it is; an http(s) URL through
    PyTorch's hub cache (``$TORCH_HOME/hub/checkpoints/<file name>``, downloaded on first use, its
    content checked against the hash prefix in the name when the name carries one, as torch.hub does)."""
    source = os.fspath(source)
    if source.startswith("file://"):  # already local: read in place, no copy in the cache
        source = unquote(urlparse(source).path)
    if not is_url(source):
        if os.path.isdir(source):
            found = [n for n in ("best.pt", "last.pt") if os.path.isfile(os.path.join(source, n))]
            hint = f" (this one holds {' and '.join(found)})" if found else ""
            raise WeightsError(
                f"{source}: a folder, not a weights file; give the file itself, e.g. a run's best.pt or last.pt{hint}"
            )
        if not os.path.isfile(source):
            raise FileNotFoundError(f"weights file not found: {source}")
        return source
    name = os.path.basename(unquote(urlparse(source).path))
    if not name:
        raise WeightsError(f"{source}: the URL names no file")
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    if not os.path.isfile(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        hashed = _HASH_IN_NAME.search(name)
        try:  # download_url_to_file writes a temporary file and renames it: no half file in the cache
            torch.hub.download_url_to_file(
                source, cached, hash_prefix=hashed.group(1) if hashed else None, progress=progress
            )
        except Exception as e:
            raise WeightsError(
                f"cannot download {source}: {type(e).__name__}: {e} (without a network, download "
                f"the file elsewhere and pass its path, or place it at {cached})"
            ) from e
    return cached


def unsafe_pickle_message(source, error: BaseException) -> str | None:
    """The message for a file that ``weights_only=True`` refused (None for any other error): one that
    holds Python objects only full unpickling could rebuild, or one that is not a pickle of data at all."""
    if not (isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error)):
        return None
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n|$)", str(error))
    detail = found.group(1).strip() if found else "not readable as data"
    if "Unsupported global" in detail:
        what = f"it holds Python objects ({detail}) that only full unpickling could rebuild"
    elif not_a_torch_file(source) is not None:  # JSON, text: no unpickling would help, and no code is at stake
        return (
            f"refusing to load {os.fspath(source)}: it is not a file of tensors and plain data, it is "
            f"{not_a_torch_file(source)}; give a training checkpoint (last.pt/best.pt) or torchvision "
            "detector weights"
        )
    else:
        what = f"it is not a file of tensors and plain data ({detail}): it is damaged, or needs full unpickling"
    return (
        f"refusing to load {os.fspath(source)}: {what}, and unpickling a file can run any code on this machine. "
        "Checkpoints and weights are read as data only (tensors, dicts, lists, numbers, strings); if you made "
        "this file yourself, save its tensors alone, e.g. torch.save(model.state_dict(), path)"
    )


def not_a_torch_file(source: str | os.PathLike) -> str | None:
    """What a file is when it is neither a zip (torch.save's format) nor a pickle (the legacy one), e.g.
    a JSON or text file given as weights; None when it may be one (or cannot be read)."""
    try:
        with open(source, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    if head.startswith(b"PK") or head[:1] == b"\x80" or not head:
        return None
    kind = "a JSON or text file" if head.isascii() else "some other kind of file"
    return (
        f"not a PyTorch weights file at all: those are zip archives written by torch.save, this one starts "
        f"with {head!r} ({kind})"
    )


def load_data_only(source: str | os.PathLike):
    """``torch.load(source, weights_only=True)`` on the CPU: a file of tensors and plain data, never code."""
    return torch.load(source, map_location="cpu", weights_only=True)


def read_state_dict(source: str | os.PathLike, *, key: str = "model") -> "OrderedDict[str, torch.Tensor]":
    """A state_dict from a file or URL: a bare state_dict, or a dict holding one under ``key``."""
    source = os.fspath(source)
    path = local_weights_file(source)
    try:
        obj = load_data_only(path)
    except Exception as e:  # an unpickling refusal, a corrupt zip: say which file
        where = source if path == source else f"{source} (cached as {path})"
        raise WeightsError(
            unsafe_pickle_message(where, e) or f"cannot read weights from {where}: {type(e).__name__}: {e}"
        ) from e
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
        obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{source} holds no state_dict (expected a dict of tensors, or one under '{key}')")
    return OrderedDict(obj)


def read_detector_checkpoint(source: str | os.PathLike) -> "tuple[OrderedDict[str, torch.Tensor], int]":
    """A detector checkpoint's state_dict (legacy keys upgraded) and its class count (background included)."""
    state_dict = upgrade_legacy_keys(read_state_dict(source))
    key = "roi_heads.box_predictor.cls_score.weight"
    if key not in state_dict:
        raise WeightsError(f"{os.fspath(source)} has no {key}: is it a Faster R-CNN checkpoint?")
    return state_dict, int(state_dict[key].shape[0])


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
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return

    def listing(title, items):
        head = "\n    ".join(items[:20])
        more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
        return f"\n  {title} ({len(items)}):\n    {head}{more}" if items else ""

    raise WeightsError(
        f"the weights in {source} do not fit this model ({type(model).__name__})"
        + listing("missing from the checkpoint", missing)
        + listing("unexpected in the checkpoint", unexpected)
        + listing("shape mismatch", shapes)
    )


def load_detector_weights(model: nn.Module, source: str | os.PathLike, *, state_dict: dict | None = None) -> None:
    """Load a torchvision-format detector checkpoint into ``model``, strictly (``state_dict``: the
    file's contents when the caller has read them already)."""
    if state_dict is None:
        state_dict = read_state_dict(source)
    state_dict = upgrade_legacy_keys(state_dict)
    # BatchNorm's step counter has no FrozenBatchNorm counterpart; it is dropped on load.
    state_dict = OrderedDict(
        (k, v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked") or k in model.state_dict()
    )
    check_compatible(model, state_dict, os.fspath(source))
    model.load_state_dict(state_dict, strict=True)


def load_backbone_weights(
    modules: dict[str, nn.Module], source: str | os.PathLike, *, skip: tuple[str, ...] = ()
) -> None:
    """Load an ImageNet ResNet checkpoint (conv1, bn1, layer1..4, fc) into the parts of a detector
    that hold those layers. ``modules`` maps a key prefix of the checkpoint to the module receiving
    the keys that start with it (the module names them the same way, e.g. a head holding "layer4.");
    the module under "" receives the rest. The classifier (fc) is not part of a detector and is
    skipped, and so are the keys starting with a prefix in ``skip`` (stages the body leaves out);
    everything else must fit exactly.

    A detector checkpoint (ours or torchvision's) works too: its ``backbone.body.`` entries are the
    ResNet trunk, with its BatchNorm statistics, so a detector trained on one dataset can start the
    backbone of another (what alternating training needs in place of ImageNet weights here)."""
    src = os.fspath(source)
    state = read_state_dict(source)
    body = "backbone.body."
    if any(k.startswith(body) for k in state):
        state = OrderedDict((k[len(body) :], v) for k, v in state.items() if k.startswith(body))
    rest = OrderedDict(
        (k, v) for k, v in state.items() if not k.startswith(("fc.", *skip)) and not k.endswith("num_batches_tracked")
    )
    parts = {}
    for prefix in [p for p in modules if p]:
        parts[prefix] = OrderedDict((k, v) for k, v in rest.items() if k.startswith(prefix))
        rest = OrderedDict((k, v) for k, v in rest.items() if not k.startswith(prefix))
    parts[""] = rest
    for prefix, module in modules.items():
        check_compatible(module, parts[prefix], src, ignore=("num_batches_tracked",))
        module.load_state_dict(parts[prefix], strict=False)  # strict but for BatchNorm's step counters
