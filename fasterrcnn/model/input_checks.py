"""Checks on what a user hands the model, with messages that say what was expected.

The model is the first place a mistake in a user's data pipeline meets a wall; a clear refusal
here is worth more than a NaN loss a thousand iterations later.
"""

import torch


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def image_problem(image: torch.Tensor) -> str | None:
    """Why a Tensor[3, H, W] is no image to detect in (a side of 0 pixels, NaN or infinite pixels), or None.
    Any size from 1x1 up is usable: the resize keeps every side at least one pixel. The model itself
    refuses only the empty image (NaN pixels give it NaN scores, so no detections); the callers that
    read images for a user (Detector, predict, evaluate) check this first and name the image."""
    if image.shape[-2] == 0 or image.shape[-1] == 0:
        return f"empty image of shape {tuple(image.shape)}"
    if image.is_floating_point():
        bad = int((~torch.isfinite(image)).sum())
        if bad:
            return f"{bad} of its {image.numel()} pixel values are NaN or infinite"
    return None


def check_images(images) -> None:
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        raise TypeError(
            "images must be a list of Tensor[3, H, W] (one per image, each of its own size), "
            f"got one batched tensor of shape {tuple(images.shape)}; pass list(batch)"
        )
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise TypeError(f"images must be a non-empty list of Tensor[3, H, W], got {_describe(images)}")
    for i, im in enumerate(images):
        if not isinstance(im, torch.Tensor) or im.dim() != 3 or im.shape[0] != 3:
            raise ValueError(f"images[{i}]: expected a Tensor[3, H, W], got {_describe(im)}")
        if not im.is_floating_point():
            raise TypeError(
                f"images[{i}]: expected a float tensor with values in [0, 1], got dtype {im.dtype} "
                "(convert uint8 images with image.float() / 255)"
            )
        if im.shape[1] == 0 or im.shape[2] == 0:
            raise ValueError(f"images[{i}]: empty image of shape {tuple(im.shape)}")


def check_targets(targets, num_images: int, num_classes: int) -> None:
    """Training targets: one dict per image with boxes float[N, 4] (x2 > x1, y2 > y1) and labels int64[N] in 1..C."""
    if targets is None:
        raise ValueError("training mode needs targets: call model(images, targets), or model.eval() for inference")
    if not isinstance(targets, (list, tuple)) or len(targets) != num_images:
        n = len(targets) if isinstance(targets, (list, tuple)) else _describe(targets)
        raise ValueError(f"targets must be a list of one dict per image ({num_images}), got {n}")
    for i, t in enumerate(targets):
        if not isinstance(t, dict):
            raise TypeError(f"targets[{i}]: expected a dict with 'boxes' and 'labels', got {_describe(t)}")
        for key in ("boxes", "labels"):
            if key not in t:
                raise KeyError(f"targets[{i}] has no '{key}' (keys: {sorted(t)})")
        boxes, labels = t["boxes"], t["labels"]
        if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"targets[{i}]['boxes']: expected a Tensor[N, 4] (x1, y1, x2, y2), got {_describe(boxes)}")
        if not boxes.is_floating_point():
            raise TypeError(f"targets[{i}]['boxes']: expected a float tensor, got dtype {boxes.dtype}")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != boxes.shape[0]:
            raise ValueError(
                f"targets[{i}]['labels']: expected an int64 Tensor[{boxes.shape[0]}] (one label per box), "
                f"got {_describe(labels)}"
            )
        if labels.dtype != torch.int64:
            raise TypeError(f"targets[{i}]['labels']: expected dtype torch.int64, got {labels.dtype}")
        if boxes.shape[0] == 0:
            continue
        bad = ~torch.isfinite(boxes).all(dim=1)
        if bad.any():
            j = int(bad.nonzero()[0])
            raise ValueError(f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} is not finite")
        degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if degenerate.any():
            j = int(degenerate.nonzero()[0])
            raise ValueError(
                f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} is degenerate: expected x2 > x1 and "
                "y2 > y1 (boxes are (x1, y1, x2, y2) in pixels)"
            )
        out_of_range = (labels < 1) | (labels >= num_classes)
        if out_of_range.any():
            j = int(out_of_range.nonzero()[0])
            raise ValueError(
                f"targets[{i}]['labels'][{j}] = {int(labels[j])} is out of range: expected 1..{num_classes - 1} "
                f"(0 is background; the model has num_classes={num_classes} including it)"
            )
