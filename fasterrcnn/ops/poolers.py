"""Multi-scale RoIAlign (and RoIPool) over a feature pyramid (Lin et al., FPN, eq. 1).

Shape legend: B images, L_i RoIs of image i, R = sum L_i RoIs, C channels, oh x ow output size.

The output is ``[R, C, oh, ow]`` in the channels-last layout (a view of rows ``[R, oh*ow, C]``): each level's
RoIs are pooled as rows and copied once to their place in the output. Building the usual contiguous
``[R, C, oh, ow]`` would cost a transpose, a concatenation and a re-ordering, three passes over ~50 MB for
1000 RoIs of 256 x 7 x 7 floats (measured in docs/design-decisions.md). A consumer that flattens it
pays the transpose once; the box head ``optimize_for_inference`` swaps in (``model/fast_path.py``) reads it as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._utils import compute_dtype, pair, rows_as_nchw
from .boxes import box_area
from .roi_align import roi_align_rows
from .roi_pool import roi_pool_rows

__all__ = [
    "MultiScalePooler",
    "MultiScaleRoIAlign",
    "MultiScaleRoIPool",
    "assign_fpn_levels",
    "infer_scale",
    "rois_with_image_index",
]


def assign_fpn_levels(
    boxes: Tensor, k_min: int, k_max: int, canonical_scale: int = 224, canonical_level: int = 4, eps: float = 1e-6
) -> Tensor:
    """Pyramid level of each box, relative to ``k_min``: ``Tensor[R, 4] -> int64[R]`` in ``[0, k_max - k_min]``.

    ``k = floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps)`` clamped to ``[k_min, k_max]``
    (eps outside the log, as torchvision, so boxes on a level boundary go where its checkpoints expect);
    a 224x224 box goes to ``canonical_level``, each halving of the side one level down.
    """
    scale = torch.sqrt(box_area(boxes))
    k = torch.floor(canonical_level + torch.log2(scale / canonical_scale) + eps)
    k = k.clamp(min=k_min, max=k_max)
    return k.to(torch.int64) - k_min


def infer_scale(feature: Tensor, image_sizes: Sequence[tuple[int, int]]) -> float:
    """``1 / stride`` of a feature map: the power of two closest (in log2) to its height over the batch's
    largest image height (a padded image is a little larger than the map says)."""
    approx = float(feature.shape[-2]) / float(max(int(s[0]) for s in image_sizes))
    return 2.0 ** float(torch.tensor(approx).log2().round())


class _PlaceRows(torch.autograd.Function):
    """``out[index_l] = rows_l`` for each level l: ``(R, index_0 int64[K_0], rows_0 [K_0, S, C], ...) -> [R, S, C]``,
    the indices a partition of ``range(R)``. One write per row, and in backward one read per row (autograd's
    ``index_copy_`` would clone the whole gradient once per level)."""

    @staticmethod
    def forward(ctx, num_rows: int, *pairs: Tensor) -> Tensor:
        indices, rows = pairs[0::2], pairs[1::2]
        out = rows[0].new_empty((num_rows, *rows[0].shape[1:]))
        for index, part in zip(indices, rows):
            out.index_copy_(0, index, part)
        ctx.save_for_backward(*indices)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        grad = grad.contiguous()
        grads: list[Tensor | None] = [None]
        for i, index in enumerate(ctx.saved_tensors):
            grads += [None, grad.index_select(0, index) if ctx.needs_input_grad[2 + 2 * i] else None]
        return tuple(grads)


def rois_with_image_index(boxes: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """B x ``[L_i, 4]`` -> ``[R, 5]`` rows ``(image index, x1, y1, x2, y2)``."""
    if not len(boxes):
        return torch.zeros((0, 5), dtype=dtype, device=device)
    return torch.cat([torch.cat((torch.full_like(b[:, :1], i), b), dim=1) for i, b in enumerate(boxes)]).to(
        device=device, dtype=dtype
    )


class MultiScalePooler(nn.Module):
    """Pool each RoI from the pyramid level its size maps to; ``pool_rows`` (the op) is the subclass's.

    ``featmap_names`` selects (and orders, finest first) the maps of the features dict; the scale of each map
    is inferred from its size relative to the largest image (``infer_scale``), so no stride has to be configured.
    forward: ``features: dict[str, Tensor[B, C, H_l, W_l]]``, ``boxes: list[Tensor[L_i, 4]]`` (image pixels),
    ``image_sizes: list[(h, w)]`` -> ``Tensor[R, C, oh, ow]`` (in the order of the concatenated boxes;
    channels-last strides, see the module's docstring).
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: int | Sequence[int],
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not featmap_names:
            raise ValueError(f"{name} featmap_names: expected at least one feature map name")
        self.featmap_names = list(featmap_names)
        self.output_size = pair(output_size, name)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def scales_and_levels(
        self, features: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> tuple[list[float], int, int]:
        """Spatial scale of each map, and ``(k_min, k_max)`` of the first and last map.

        Maps of the same scale count once: the levels run from k_min to k_max and RoIs go to the first maps
        (MobileNetV3's FPN returns two maps at stride 32, and every RoI is pooled from the first, as in
        torchvision)."""
        scales = [infer_scale(f, image_sizes) for f in features]
        k_min = int(round(-math.log2(scales[0])))
        k_max = int(round(-math.log2(scales[-1])))
        if not 1 <= k_max - k_min + 1 <= len(features):
            raise ValueError(
                f"{type(self).__name__}: feature maps {self.featmap_names} have inferred scales "
                f"{scales}; expected one map per pyramid level from 2^-{k_min} to 2^-{k_max}"
            )
        return scales, k_min, k_max

    def pool_rows(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        """One map's RoIs ``[K, 5]`` -> rows ``[K, oh*ow, C]``."""
        raise NotImplementedError

    def _maps(self, features: dict[str, Tensor], image_sizes: list[tuple[int, int]]) -> list[Tensor]:
        # Names the backbone does not return are passed over (as torchvision's pooler does: the default
        # ["0", "1", "2", "3"] then fits a backbone returning fewer maps); none at all is an error.
        present = [name for name in self.featmap_names if name in features]
        if not present:
            raise KeyError(
                f"{type(self).__name__} features: none of the maps {self.featmap_names}; got {list(features)}"
            )
        if not image_sizes:
            raise ValueError(f"{type(self).__name__} image_sizes: expected one (h, w) per image, got none")
        return [features[name] for name in present]

    def _levels(self, boxes: Tensor, k_min: int, k_max: int) -> Tensor:
        return assign_fpn_levels(boxes, k_min, k_max, self.canonical_scale, self.canonical_level)

    def roi_levels(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> Tensor:
        """The map each RoI is pooled from, as forward chooses it: int64 ``[R]``, an index into the maps of
        ``featmap_names`` that ``features`` holds."""
        maps = self._maps(features, image_sizes)
        _, k_min, k_max = self.scales_and_levels(maps, image_sizes)
        rois = rois_with_image_index(boxes, compute_dtype(maps[0].dtype), maps[0].device)
        if len(maps) == 1:
            return torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
        return self._levels(rois[:, 1:], k_min, k_max)

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]) -> Tensor:
        maps = self._maps(features, image_sizes)
        scales, k_min, k_max = self.scales_and_levels(maps, image_sizes)
        # box coordinates in float32 at least, even on bfloat16 maps
        dtype, device = compute_dtype(maps[0].dtype), maps[0].device
        oh, ow = self.output_size
        channels = maps[0].shape[1]

        rois = rois_with_image_index(boxes, dtype, device)  # [R, 5]
        num_rois = rois.shape[0]
        if len(maps) == 1:
            rows = self.pool_rows(maps[0], rois, scales[0])
        else:
            levels = self._levels(rois[:, 1:], k_min, k_max)
            order = torch.sort(levels, stable=True).indices  # RoIs grouped by level
            counts = torch.bincount(levels, minlength=len(maps)).tolist()
            pairs, lo = [], 0
            for level, (feature, scale) in enumerate(zip(maps, scales)):
                hi = lo + counts[level]
                if hi > lo:
                    index = order[lo:hi]
                    pairs += [index, self.pool_rows(feature, rois[index], scale)]
                lo = hi
            if not pairs:
                rows = maps[0].new_zeros((0, oh * ow, channels))
            elif len(pairs) == 2:  # every RoI on one level: the rows are in box order already
                rows = pairs[1]
            else:
                rows = _PlaceRows.apply(num_rois, *pairs)
        return rows_as_nchw(rows, oh, ow)


class MultiScaleRoIAlign(MultiScalePooler):
    """RoIAlign over several feature maps, each RoI read from the level its size maps to (FPN's pooler)."""

    def __init__(
        self,
        featmap_names: list[str],
        output_size: int | Sequence[int],
        sampling_ratio: int,
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ) -> None:
        super().__init__(featmap_names, output_size, canonical_scale=canonical_scale, canonical_level=canonical_level)
        self.sampling_ratio = int(sampling_ratio)

    def pool_rows(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        return roi_align_rows(feature, rois, self.output_size, scale, self.sampling_ratio, aligned=False)


class MultiScaleRoIPool(MultiScalePooler):
    """The same level assignment with Fast R-CNN's RoIPool (quantised max) on each map instead of
    RoIAlign; ``sampling_ratio`` is unused. For the RoIPool-against-RoIAlign experiment on a pyramid."""

    def __init__(
        self,
        featmap_names: list[str],
        output_size: int | Sequence[int],
        sampling_ratio: int = 0,
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ) -> None:
        super().__init__(featmap_names, output_size, canonical_scale=canonical_scale, canonical_level=canonical_level)
        self.sampling_ratio = int(sampling_ratio)

    def pool_rows(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        return roi_pool_rows(feature, rois, self.output_size, scale)
