"""Per-image selection in a flat batch: the RPN and the RoI heads filter a whole batch's boxes at once,
then each image keeps its best few.

Shapes: M ranked entries of the whole batch (best first), B images.
    top_n_per_image: keep int64 [M], image int64 [M] -> keep int64 [K] grouped by image (image 0's first),
                     each image's at most n best in rank order; and each image's count before the cut [B]
"""

import torch


def top_n_per_image(
    keep: torch.Tensor, image: torch.Tensor, num_images: int, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``keep``: entries ranked best first (NMS's output), ``image``: the image of each. A stable sort
    by image keeps the rank order inside each image; an entry's rank in its image is its position
    minus the position of its image's first entry. -> (kept entries, count per image before the cut)."""
    order = torch.sort(image, stable=True).indices
    keep, image = keep[order], image[order]
    found = torch.bincount(image, minlength=num_images)  # [B]
    rank = torch.arange(keep.numel(), device=keep.device) - (torch.cumsum(found, 0) - found)[image]
    return keep[rank < n], found
