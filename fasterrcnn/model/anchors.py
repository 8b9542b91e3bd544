"""Anchors: reference boxes tiled over every feature-map location.

Shapes: L levels; level l has a feature map [B, C, H_l, W_l] and A_l = len(sizes[l]) * len(ratios[l])
anchors per location.
    cell_anchors[l]: [A_l, 4]            boxes centred on (0, 0): ratio-major, then size
    grid_anchors:    [H_l * W_l * A_l, 4] row by row (y), then column (x), then the A_l cell anchors
    forward:         one [sum_l H_l*W_l*A_l, 4] tensor per image, levels concatenated in order (the
                     same tensor for every image, kept for the next batch of the same size)
An anchor of size s and aspect ratio r = h / w has w = s / sqrt(r) and h = s * sqrt(r) (area s^2),
rounded to whole pixels. The anchor at grid cell (i, j) is centred at (j * stride_x, i * stride_y),
where stride = padded image size // feature-map size.
The layout (which of the A_l channels of the RPN head is which anchor) is part of the checkpoint
format: torchvision's weights assume exactly this order.
"""

import torch
from torch import nn


def cell_anchors(sizes, aspect_ratios, dtype=torch.float32, device=None) -> torch.Tensor:
    """[len(ratios) * len(sizes), 4] anchors centred on the origin (ratio-major order)."""
    sizes = torch.as_tensor(sizes, dtype=dtype, device=device)
    ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * sizes[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


class AnchorGenerator(nn.Module):
    """One tuple of sizes and one tuple of aspect ratios per feature level."""

    def __init__(self, sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5):
        super().__init__()
        sizes = tuple(tuple(s) for s in sizes)
        aspect_ratios = tuple(tuple(r) for r in aspect_ratios)
        if len(aspect_ratios) == 1 and len(sizes) > 1:
            aspect_ratios = aspect_ratios * len(sizes)
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"anchor sizes give {len(sizes)} levels but aspect_ratios give {len(aspect_ratios)}")
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        self.cell_anchors = [cell_anchors(s, r) for s, r in zip(sizes, aspect_ratios)]
        # the anchors of the last few (grid sizes, strides, dtype, device): inference on images of one
        # size, or batches padded to a few sizes, builds them once
        self._cache: dict[tuple, torch.Tensor] = {}

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def grid_anchors(
        self, grid_sizes: list[tuple[int, int]], strides: list[tuple[int, int]], dtype=torch.float32, device=None
    ) -> list[torch.Tensor]:
        """Anchors of each level: [H_l * W_l * A_l, 4]."""
        if len(grid_sizes) != len(self.cell_anchors):
            raise ValueError(
                f"the backbone gives {len(grid_sizes)} feature maps but the anchor generator was built for "
                f"{len(self.cell_anchors)} levels (sizes={self.sizes}); give one tuple of sizes per feature map"
            )
        out = []
        for base, (gh, gw), (sh, sw) in zip(self.cell_anchors, grid_sizes, strides):
            base = base.to(dtype=dtype, device=device)
            xs = torch.arange(gw, dtype=torch.int32, device=device).to(dtype) * sw
            ys = torch.arange(gh, dtype=torch.int32, device=device).to(dtype) * sh
            shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=1)  # [H*W, 4]
            # every location gets every cell anchor: [H*W, 1, 4] + [1, A, 4] -> [H*W*A, 4]
            out.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
        return out

    @staticmethod
    def strides_for(image_size: tuple[int, int], grid_sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [(image_size[0] // gh, image_size[1] // gw) for gh, gw in grid_sizes]

    def forward(self, image_tensors: torch.Tensor, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """image_tensors [B, 3, Hp, Wp] (padded batch), feature_maps [B, C, H_l, W_l] -> B x [sum_l H_l W_l A_l, 4]."""
        grid_sizes = [tuple(f.shape[-2:]) for f in feature_maps]
        strides = self.strides_for(tuple(image_tensors.shape[-2:]), grid_sizes)
        dtype = feature_maps[0].dtype if feature_maps[0].is_floating_point() else torch.float32
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32  # anchor coordinates need more precision than the features
        device = feature_maps[0].device
        key = (tuple(grid_sizes), tuple(strides), dtype, device)
        anchors = self._cache.get(key)
        if anchors is None:
            anchors = torch.cat(self.grid_anchors(grid_sizes, strides, dtype, device))
            if len(self._cache) >= 8:
                self._cache.pop(next(iter(self._cache)))  # the oldest
            self._cache[key] = anchors
        return [anchors] * image_tensors.shape[0]  # one tensor for every image: do not modify it in place
