"""Multi-scale RoIAlign (and RoIPool) over a feature pyramid (Lin et al., FPN, eq. 1).

Shape legend: B images, L_i RoIs of image i, R = sum L_i RoIs, C channels, oh x ow output size.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ._utils import pair, serial_ops
from .boxes import box_area
from .roi_align import roi_align
from .roi_pool import roi_pool

__all__ = ["MultiScaleRoIAlign", "MultiScaleRoIPool", "assign_fpn_levels"]


def assign_fpn_levels(boxes: Tensor, k_min: int, k_max: int, canonical_scale: int = 224,
                      canonical_level: int = 4, eps: float = 1e-6) -> Tensor:
    """Pyramid level of each box, relative to ``k_min``: ``Tensor[R, 4] -> int64[R]`` in ``[0, k_max - k_min]``.

    ``k = floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps)`` clamped to ``[k_min, k_max]``
    (eps outside the log, as torchvision, so boxes on a level boundary go where its checkpoints expect);
    a 224x224 box goes to ``canonical_level``, each halving of the side one level down.
    """
    scale = torch.sqrt(box_area(boxes))
    k = torch.floor(canonical_level + torch.log2(scale / canonical_scale) + eps)
    k = k.clamp(min=k_min, max=k_max)
    return k.to(torch.int64) - k_min


def _infer_scale(feature: Tensor, original_size: tuple[int, int]) -> float:
    """Power of two closest (in log2) to ``feature size / image size``; taken on the height, like the ecosystem."""
    approx = float(feature.shape[-2]) / float(original_size[0])
    return 2.0 ** float(torch.tensor(approx).log2().round())


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign over several feature maps, each RoI read from the level its size maps to.

    ``featmap_names`` selects (and orders, finest first) the maps of the features dict; the scale of each map
    is inferred from its size relative to the largest image, so no stride has to be configured.
    forward: ``features: dict[str, Tensor[B, C, H_l, W_l]]``, ``boxes: list[Tensor[L_i, 4]]`` (image pixels),
    ``image_sizes: list[(h, w)]`` -> ``Tensor[R, C, oh, ow]`` (in the order of the concatenated boxes).
    """

    def __init__(self, featmap_names: list[str], output_size: int | Sequence[int], sampling_ratio: int, *,
                 canonical_scale: int = 224, canonical_level: int = 4) -> None:
        super().__init__()
        if not featmap_names:
            raise ValueError("MultiScaleRoIAlign featmap_names: expected at least one feature map name")
        self.featmap_names = list(featmap_names)
        self.output_size = pair(output_size, "MultiScaleRoIAlign")
        self.sampling_ratio = int(sampling_ratio)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def scales_and_levels(self, features: Sequence[Tensor],
                          image_sizes: Sequence[tuple[int, int]]) -> tuple[list[float], int, int]:
        """Spatial scale of each map, and ``(k_min, k_max)`` of the first and last map."""
        original = (max(int(s[0]) for s in image_sizes), max(int(s[1]) for s in image_sizes))
        scales = [_infer_scale(f, original) for f in features]
        k_min = int(round(-math.log2(scales[0])))
        k_max = int(round(-math.log2(scales[-1])))
        if k_max - k_min + 1 != len(features):
            raise ValueError(f"MultiScaleRoIAlign: feature maps {self.featmap_names} have inferred scales {scales}; "
                             f"expected one map per pyramid level from 2^-{k_min} to 2^-{k_max}")
        return scales, k_min, k_max

    def pool(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        """One map's RoIs ``[K, 5]`` -> ``[K, C, oh, ow]``."""
        return roi_align(feature, rois, self.output_size, scale, self.sampling_ratio, aligned=False)

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor],
                image_sizes: list[tuple[int, int]]) -> Tensor:
        with serial_ops():  # as roi_align: on the calling CPU thread (see serial_ops)
            return self._forward(features, boxes, image_sizes)

    def _forward(self, features: dict[str, Tensor], boxes: list[Tensor],
                 image_sizes: list[tuple[int, int]]) -> Tensor:
        missing = [name for name in self.featmap_names if name not in features]
        if missing:
            raise KeyError(f"MultiScaleRoIAlign features: missing maps {missing}; got {list(features)}")
        maps = [features[name] for name in self.featmap_names]
        if not image_sizes:
            raise ValueError("MultiScaleRoIAlign image_sizes: expected one (h, w) per image, got none")
        scales, k_min, k_max = self.scales_and_levels(maps, image_sizes)
        dtype, device = maps[0].dtype, maps[0].device
        oh, ow = self.output_size

        # [R, 5] rois: (image index, x1, y1, x2, y2)
        rois = torch.cat([torch.cat((torch.full_like(b[:, :1], i), b), dim=1)
                          for i, b in enumerate(boxes)]).to(device=device, dtype=dtype) \
            if len(boxes) else torch.zeros((0, 5), dtype=dtype, device=device)
        if len(maps) == 1:
            return self.pool(maps[0], rois, scales[0])

        levels = assign_fpn_levels(rois[:, 1:], k_min, k_max, self.canonical_scale, self.canonical_level)
        order = torch.sort(levels, stable=True).indices  # RoIs grouped by level
        counts = torch.bincount(levels, minlength=len(maps)).tolist()
        pieces, lo = [], 0
        for level, (feature, scale) in enumerate(zip(maps, scales)):
            hi = lo + counts[level]
            if hi > lo:
                pieces.append(self.pool(feature, rois[order[lo:hi]], scale))
            lo = hi
        if not pieces:
            return maps[0].new_zeros((0, maps[0].shape[1], oh, ow))
        grouped = pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # [R, C, oh, ow] in level order
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return grouped.index_select(0, inverse)


class MultiScaleRoIPool(MultiScaleRoIAlign):
    """The same level assignment with Fast R-CNN's RoIPool (quantised max) on each map instead of
    RoIAlign; ``sampling_ratio`` is unused. For the RoIPool-against-RoIAlign experiment on a pyramid."""

    def __init__(self, featmap_names: list[str], output_size: int | Sequence[int], sampling_ratio: int = 0, *,
                 canonical_scale: int = 224, canonical_level: int = 4) -> None:
        super().__init__(featmap_names, output_size, sampling_ratio, canonical_scale=canonical_scale,
                         canonical_level=canonical_level)

    def pool(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        return roi_pool(feature, rois, self.output_size, scale)
