"""The model's own input transform: normalise, resize, batch with padding; and map detections back.

Shapes: B images of their own sizes [3, H_i, W_i] in [0, 1]
    normalize:  (x - mean) / std per channel
    resize:     scale = min(min_size / min(H, W), max_size / max(H, W)); bilinear;
                new size max(1, floor(H * scale)) x max(1, floor(W * scale)); target boxes scale with it
                (a very thin image, 1x4000 say, keeps a side of one pixel rather than none: the model
                runs on it, its anchors clipped to that pixel, and usually finds nothing)
    batch:      zero-pad into [B, 3, Hp, Wp], Hp and Wp the largest sizes rounded up to size_divisible
    postprocess: detected boxes scaled from the resized size back to the original size
The output keeps each image's resized (unpadded) size: boxes are clipped to it, not to the padding.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .sampler import sample_generators


@dataclass
class ImageList:
    """A padded batch and the size of each image inside it (before padding)."""

    tensors: torch.Tensor  # [B, 3, Hp, Wp]
    image_sizes: list[tuple[int, int]]  # B x (H_i, W_i)


def resize_boxes(boxes: torch.Tensor, original_size: tuple[int, int], new_size: tuple[int, int]) -> torch.Tensor:
    """Scale xyxy boxes from an image of original_size (H, W) to one of new_size."""
    ratio_h = torch.tensor(new_size[0], dtype=torch.float32) / torch.tensor(original_size[0], dtype=torch.float32)
    ratio_w = torch.tensor(new_size[1], dtype=torch.float32) / torch.tensor(original_size[1], dtype=torch.float32)
    scale = torch.stack([ratio_w, ratio_h, ratio_w, ratio_h]).to(device=boxes.device, dtype=boxes.dtype)
    return boxes * scale


def resized_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """(floor(H * scale), floor(W * scale)) in double precision, each side at least one pixel."""
    return max(1, math.floor(int(h) * scale)), max(1, math.floor(int(w) * scale))


class DetectionTransform(nn.Module):
    def __init__(
        self,
        min_size: int | tuple[int, ...] = 800,
        max_size: int = 1333,
        image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        image_std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        size_divisible: int = 32,
    ):
        super().__init__()
        self.min_size = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        self.max_size = max_size
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.size_divisible = size_divisible
        self.memory_format = torch.contiguous_format  # channels_last: see FasterRCNN.to_channels_last

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]

    def choose_min_size(self, generator: torch.Generator | None = None) -> int:
        """Training picks one of the min sizes at random (multi-scale training); testing uses the last.
        The draw comes from ``generator`` when given (the image's own, seeded from its target's
        ``sample_seed``), else from torch's global RNG."""
        if not self.training or len(self.min_size) == 1:
            return self.min_size[-1]
        return self.min_size[int(torch.randint(len(self.min_size), (), generator=generator).item())]

    def resize(self, image: torch.Tensor, target: dict | None) -> tuple[torch.Tensor, dict | None]:
        h, w = image.shape[-2:]
        generator = None
        if self.training and len(self.min_size) > 1 and target is not None and "sample_seed" in target:
            generator = sample_generators([target], stream=2)[0]  # independent of the batch and the process
        # In double precision, then floor(H * scale): the sizes torchvision's eager model uses, so
        # that its checkpoints see the same pixels (a side of 427 becomes 800, not 799).
        scale = min(self.choose_min_size(generator) / min(h, w), self.max_size / max(h, w))
        image = F.interpolate(image[None], size=resized_size(h, w, scale), mode="bilinear", align_corners=False)[0]
        if target is not None and "boxes" in target:
            target = dict(target)
            target["boxes"] = resize_boxes(target["boxes"], (h, w), tuple(image.shape[-2:]))
        return image, target

    def batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        d = self.size_divisible
        hp = int(math.ceil(max(im.shape[-2] for im in images) / d) * d)
        wp = int(math.ceil(max(im.shape[-1] for im in images) / d) * d)
        batched = images[0].new_zeros((len(images), images[0].shape[0], hp, wp))
        for out, im in zip(batched, images):
            out[:, : im.shape[-2], : im.shape[-1]].copy_(im)
        return batched.contiguous(memory_format=self.memory_format)

    def forward(
        self, images: list[torch.Tensor], targets: list[dict] | None = None
    ) -> tuple[ImageList, list[dict] | None]:
        out_images, out_targets = [], [] if targets is not None else None
        for i, image in enumerate(images):
            image, target = self.resize(self.normalize(image), None if targets is None else targets[i])
            out_images.append(image)
            if out_targets is not None:
                out_targets.append(target)
        sizes = [tuple(int(s) for s in im.shape[-2:]) for im in out_images]
        return ImageList(self.batch(out_images), sizes), out_targets

    def postprocess(
        self, detections: list[dict], image_sizes: list[tuple[int, int]], original_sizes: list[tuple[int, int]]
    ) -> list[dict]:
        return [
            {**det, "boxes": resize_boxes(det["boxes"], size, orig)}
            for det, size, orig in zip(detections, image_sizes, original_sizes)
        ]
