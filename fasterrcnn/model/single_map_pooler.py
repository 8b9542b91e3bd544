"""RoI pooling on one feature map, as in the original Faster R-CNN: RoIPool (Fast R-CNN's quantised
max) or RoIAlign (bilinear, Mask R-CNN), chosen by name.

Shapes: features {"0": [B, D, H, W]}, proposals B x [R_i, 4] -> [sum R_i, D, P, P] (channels-last strides,
as MultiScaleRoIAlign's output).
The map's stride is inferred as the pyramid pooler infers it (``ops.infer_scale``).
"""

import torch
from torch import nn

from ..ops._utils import pair, rows_as_nchw
from ..ops.poolers import infer_scale
from ..ops.roi_align import roi_align_rows
from ..ops.roi_pool import roi_pool_rows

ROI_OPS = ("roi_align", "roi_pool")


class SingleMapRoIPooler(nn.Module):
    def __init__(
        self,
        featmap_name: str = "0",
        output_size: int = 7,
        *,
        op: str = "roi_align",
        sampling_ratio: int = 0,
        aligned: bool = False,
    ):
        super().__init__()
        if op not in ROI_OPS:
            raise ValueError(f"op must be one of {ROI_OPS}, got {op!r}")
        self.featmap_name = featmap_name
        self.output_size = output_size
        self.op = op
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def roi_levels(
        self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor], image_sizes: list[tuple[int, int]]
    ) -> torch.Tensor:
        """The map each RoI is pooled from: always the one, int64 zeros ``[R]``."""
        return torch.zeros(
            sum(p.shape[0] for p in proposals), dtype=torch.int64, device=features[self.featmap_name].device
        )

    def forward(
        self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor], image_sizes: list[tuple[int, int]]
    ) -> torch.Tensor:
        feature = features[self.featmap_name]
        scale = infer_scale(feature, image_sizes)
        oh, ow = pair(self.output_size, "SingleMapRoIPooler")
        # the ops take the boxes in their compute dtype (float32 at least, even on a bfloat16 map)
        if self.op == "roi_pool":
            rows = roi_pool_rows(feature, proposals, (oh, ow), spatial_scale=scale)
        else:
            rows = roi_align_rows(
                feature,
                proposals,
                (oh, ow),
                spatial_scale=scale,
                sampling_ratio=self.sampling_ratio,
                aligned=self.aligned,
            )
        return rows_as_nchw(rows, oh, ow)  # [R, D, P, P], channels-last strides
