"""``model.options``: keyword arguments of the configured builder (``model/builders.py``) and of
``FasterRCNN``, checked against their signatures before any work.

The names and the types come from the signatures themselves (an option a builder does not take,
or a value of the wrong type, is an error naming ``model.options.<key>``); the allowed ranges of
the numeric and named options are kept here, once. Arguments that are not options (the class
count, the weights, modules built by the builder) are left out.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
import typing
from collections.abc import Callable
from typing import cast

from ..model import BUILDERS
from ..model.faster_rcnn import FasterRCNN

# set by the builder or by their own config keys (model.weights, model.weights_backbone,
# model.trainable_backbone_layers), or modules the builders make
NOT_OPTIONS = {
    "self",
    "backbone",
    "num_classes",
    "weights",
    "weights_backbone",
    "trainable_backbone_layers",
    "rpn_anchor_generator",
    "rpn_head",
    "box_roi_pool",
    "box_head",
    "box_predictor",
}


def _int_at_least(n):
    return (lambda v: v >= n), f"an integer >= {n}"


def _number_in(lo, hi, lo_open=False):
    return (
        lambda v: math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi,
        f"a number in {'(' if lo_open else '['}{lo}, {hi}]",
    )


def _all_at_least_1(v):
    values = v if isinstance(v, (list, tuple)) else [v]
    return bool(values) and all(x >= 1 for x in values)


# option -> (test on a value of the right type, what is allowed)
RANGES = {
    **{
        k: _number_in(0, 1)
        for k in (
            "rpn_nms_thresh",
            "rpn_fg_iou_thresh",
            "rpn_bg_iou_thresh",
            "rpn_score_thresh",
            "box_score_thresh",
            "box_nms_thresh",
            "box_fg_iou_thresh",
            "box_bg_iou_thresh",
        )
    },
    **{k: _number_in(0, 1, lo_open=True) for k in ("rpn_positive_fraction", "box_positive_fraction")},
    **{
        k: _int_at_least(1)
        for k in (
            "max_size",
            "size_divisible",
            "fpn_channels",
            "representation_size",
            "rpn_pre_nms_top_n_train",
            "rpn_pre_nms_top_n_test",
            "rpn_post_nms_top_n_train",
            "rpn_post_nms_top_n_test",
            "rpn_batch_size_per_image",
            "box_batch_size_per_image",
            "box_detections_per_img",
            "roi_output_size",
        )
    },
    "min_size": (_all_at_least_1, "an integer >= 1 or a list of them (multi-scale training)"),
    "anchor_sizes": (lambda v: isinstance(v, (list, tuple)) and _all_at_least_1(v), "a list of integers >= 1"),
    "fpn_norm": (lambda v: v in ("none", "bn", "gn"), "one of none, bn, gn"),
    "roi_op": (lambda v: v in ("roi_pool", "roi_align"), "one of roi_pool, roi_align"),
    "box_nms": (lambda v: v in ("nms", "soft_linear", "soft_gaussian"), "one of nms, soft_linear, soft_gaussian"),
    "box_soft_nms_sigma": _number_in(0, 10, lo_open=True),
    "box_soft_nms_min_score": _number_in(0, 1),
    "cascade_iou": (
        lambda v: len(v) == 0 or (len(v) >= 2 and all(0 < x < 1 for x in v) and list(v) == sorted(set(v))),
        "empty (no cascade) or at least two rising IoU thresholds in (0, 1), e.g. [0.5, 0.6, 0.7]",
    ),
    "cascade_loss_weights": (lambda v: all(x > 0 for x in v), "a list of positive numbers, one per stage"),
    **{
        k: (lambda v: v in ("smooth_l1", "l1", "giou"), "one of smooth_l1, l1, giou")
        for k in ("rpn_box_loss", "box_loss")
    },
}


def _keywords(fn) -> dict[str, object]:
    """name -> annotation (or the default's type where there is none) of ``fn``'s keyword arguments,
    without those a ``functools.partial`` has bound."""
    target = fn.func if isinstance(fn, functools.partial) else fn
    params = inspect.signature(target).parameters
    bound = set(fn.keywords) | set(list(params)[: len(fn.args)]) if isinstance(fn, functools.partial) else set()
    hints = typing.get_type_hints(target)
    out = {}
    for name, p in params.items():
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or name in bound or name in NOT_OPTIONS:
            continue
        if p.kind == p.POSITIONAL_ONLY or (p.kind == p.POSITIONAL_OR_KEYWORD and p.default is p.empty):
            continue
        out[name] = hints.get(name, type(p.default) if p.default is not p.empty else object)
    return out


@functools.cache
def accepted_options(arch: str) -> dict[str, object]:
    """The options ``arch``'s builder takes: its own keywords, and FasterRCNN's when it passes the rest on."""
    builder = cast(Callable[..., FasterRCNN], BUILDERS[arch])  # the dict's values are functions and partials
    target = builder.func if isinstance(builder, functools.partial) else builder
    takes_rest = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(target).parameters.values())
    return {**(_keywords(FasterRCNN.__init__) if takes_rest else {}), **_keywords(builder)}


def _type_name(annotation) -> str:
    """How a YAML user would say the type: int, float, a list of int, ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin in (tuple, list) or annotation in (tuple, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} {_type_name(args[0])}" if args else "a list"
    return getattr(annotation, "__name__", str(annotation))


def _matches(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is object:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (tuple, list) or annotation in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(annotation)
        if not args:
            return True
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (str, bool):
        return isinstance(value, annotation)
    return True  # an annotation this check does not know: the builder checks the value


def option_problem(arch: str, key: str, value) -> str | None:
    """What is wrong with ``model.options.<key>=value`` for ``arch`` (None: nothing)."""
    accepted = accepted_options(arch)
    if key not in accepted:
        return (
            f"model.options.{key}: not an option of {arch} (it takes {', '.join(sorted(accepted))}); "
            "see fasterrcnn/model/builders.py"
        )
    annotation = accepted[key]
    test, allowed = RANGES.get(key, (lambda v: True, _type_name(annotation)))
    if not (_matches(value, annotation) and test(value)):
        return f"model.options.{key} must be {allowed}, got {value!r}"
    return None
