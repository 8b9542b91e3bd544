"""top_n_per_image: each image's n best of a flat, ranked batch, grouped by image."""

import torch

from fasterrcnn.model.per_image import top_n_per_image


def test_top_n_per_image_hand_values():
    # entries ranked best first across the batch (as NMS returns them), their images interleaved
    keep = torch.tensor([9, 4, 7, 0, 5, 2, 8, 1])
    image = torch.tensor([2, 0, 2, 0, 0, 2, 2, 0])
    kept, found = top_n_per_image(keep, image, num_images=4, n=2)
    # image 0: 4, 0 (of 4, 0, 5, 1); image 1: none; image 2: 9, 7 (of 9, 7, 2, 8); image 3: none
    assert kept.tolist() == [4, 0, 9, 7]
    assert found.tolist() == [4, 0, 4, 0]
    kept, _ = top_n_per_image(keep, image, num_images=3, n=10)
    assert kept.tolist() == [4, 0, 5, 1, 9, 7, 2, 8]
    empty, found = top_n_per_image(keep[:0], image[:0], num_images=2, n=3)
    assert empty.numel() == 0 and found.tolist() == [0, 0]
