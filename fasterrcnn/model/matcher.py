"""Matcher: give each prediction (anchor or proposal) the ground-truth box it overlaps most.

Input:  match_quality [G, N] (IoU of G ground-truth boxes with N predictions), or a batch of them
        [B, G, N] where images with fewer boxes are padded with rows of -1 (``padded_box_iou`` makes it).
Output: matches int64 [N] (or [B, N]): the index of the matched ground truth, or
        BELOW_LOW_THRESHOLD (-1)    best IoU < low           (a negative, "background")
        BETWEEN_THRESHOLDS (-2)     low <= best IoU < high   (ignored when high > low)
With allow_low_quality_matches (the RPN's rule from the paper), every ground-truth box also keeps the
prediction(s) it overlaps most, even below ``high``, so that no object is left without a positive;
ties for that best IoU all count. A ground-truth box that overlaps no prediction at all (best IoU 0)
claims nothing: otherwise every prediction would tie at 0 and become its positive.

A batch is matched with a handful of tensor ops whatever B is (no loop over images, no host sync): a
padding row (-1) never wins a prediction and never claims one, so each image's matches are those of
its own [G_i, N] matrix; an image with no boxes at all gets only negatives.
"""

import torch

from ..ops.boxes import box_area

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2
PADDING_QUALITY = -1.0  # the match quality of a padding row: below any IoU


class Matcher:
    def __init__(self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False):
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold {low_threshold} must not exceed high_threshold {high_threshold}")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, match_quality: torch.Tensor) -> torch.Tensor:
        """[G, N] -> [N] (one image; G must be >= 1), or [B, G, N] -> [B, N] (a padded batch)."""
        if match_quality.dim() == 2:
            if match_quality.shape[0] == 0:
                raise ValueError(
                    "Matcher needs at least one ground-truth box; handle images without objects before matching"
                )
            return self._match(match_quality[None])[0]
        if match_quality.dim() != 3:
            raise ValueError(f"match_quality must be [G, N] or [B, G, N], got shape {tuple(match_quality.shape)}")
        return self._match(match_quality)

    def _match(self, quality: torch.Tensor) -> torch.Tensor:
        num_images, num_gt, n = quality.shape
        if n == 0 or num_gt == 0:  # nothing to match, or no image has a box: all negatives
            return torch.full((num_images, n), BELOW_LOW_THRESHOLD, dtype=torch.int64, device=quality.device)
        best_iou, raw_matches = quality.max(dim=1)  # over ground truth: [B, N]
        matches = torch.where(
            best_iou >= self.high_threshold,
            raw_matches,
            torch.where(best_iou < self.low_threshold, BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS),
        )
        if self.allow_low_quality_matches:
            # each gt's best predictions (all ties) get back their match; padding rows (-1) and gts
            # overlapping nothing (best 0) claim nothing: their "best" becomes 2, which no IoU equals
            best_per_gt = quality.amax(dim=2, keepdim=True)  # [B, G, 1]
            best_per_gt.masked_fill_(best_per_gt <= 0, 2.0)
            is_best = (quality == best_per_gt).any(dim=1)  # [B, N]
            matches = torch.where(is_best, raw_matches, matches)
        return matches


def pad_ragged(
    tensors: list[torch.Tensor], *, min_length: int = 1, padding_value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """B x [L_i, ...] -> (padded [B, L, ...], valid bool [B, L]) with L = max(L_i, min_length).

    ``pad_sequence`` does the copying in one op, on the tensors' device (no host sync); ``min_length``
    1 leaves a batch of images without boxes something to gather from."""
    length = max(max((t.shape[0] for t in tensors), default=0), min_length)
    filler = tensors[0].new_full((length, *tensors[0].shape[1:]), padding_value)  # pads every row to L
    padded = torch.nn.utils.rnn.pad_sequence([*tensors, filler], batch_first=True, padding_value=padding_value)
    flags = [torch.ones(t.shape[0], dtype=torch.bool, device=t.device) for t in tensors]
    valid = torch.nn.utils.rnn.pad_sequence([*flags, flags[0].new_zeros(length)], batch_first=True)
    return padded[:-1], valid[:-1]


def padded_box_iou(gt: torch.Tensor, gt_valid: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU of every image's gt boxes with its predictions: gt [B, G, 4], gt_valid [B, G], boxes
    [B, N, 4] (or [1, N, 4], shared by all images, as anchors are) -> [B, G, N], padding rows -1.

    The same arithmetic as ``ops.box_iou`` (so each image's matrix is equal to its own ``box_iou``),
    written per coordinate: the [B, G, N, 2] corner tensors of the textbook form would cost four
    times the memory on 200k anchors.
    """
    area_gt = box_area(gt)[:, :, None]  # [B, G, 1]
    area_boxes = box_area(boxes)[:, None, :]  # [B, 1, N]
    g = gt[:, :, None, :]  # [B, G, 1, 4]
    b = boxes[:, None, :, :]  # [B, 1, N, 4]
    # in place where possible: every op here touches B * G * N values, and fresh allocations of that
    # size cost page faults on a CPU
    iw = torch.minimum(g[..., 2], b[..., 2]).sub_(torch.maximum(g[..., 0], b[..., 0])).clamp_(min=0)
    ih = torch.minimum(g[..., 3], b[..., 3]).sub_(torch.maximum(g[..., 1], b[..., 1])).clamp_(min=0)
    inter = iw.mul_(ih)
    union = (area_gt + area_boxes).sub_(inter)
    # a pair with union 0 (two zero-area boxes) has inter 0: 0 / tiny = 0, as box_iou's guarded division
    iou = inter.div_(union.clamp_(min=torch.finfo(union.dtype).tiny))
    return iou.masked_fill_(~gt_valid[:, :, None], PADDING_QUALITY)
