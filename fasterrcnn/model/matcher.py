"""Matcher: give each prediction (anchor or proposal) the ground-truth box it overlaps most.

Input:  match_quality [G, N] (IoU of G ground-truth boxes with N predictions).
Output: matches int64 [N]: the index of the matched ground truth, or
        BELOW_LOW_THRESHOLD (-1)    best IoU < low           (a negative, "background")
        BETWEEN_THRESHOLDS (-2)     low <= best IoU < high   (ignored when high > low)
With allow_low_quality_matches (the RPN's rule from the paper), every ground-truth box also keeps the
prediction(s) it overlaps most, even below ``high``, so that no object is left without a positive;
ties for that best IoU all count. A ground-truth box that overlaps no prediction at all (best IoU 0)
claims nothing: otherwise every prediction would tie at 0 and become its positive.
"""
import torch

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


class Matcher:
    def __init__(self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False):
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold {low_threshold} must not exceed high_threshold {high_threshold}")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, match_quality: torch.Tensor) -> torch.Tensor:
        if match_quality.shape[0] == 0:
            raise ValueError("Matcher needs at least one ground-truth box; handle images without objects before matching")
        if match_quality.shape[1] == 0:
            return torch.empty(0, dtype=torch.int64, device=match_quality.device)
        best_iou, matches = match_quality.max(dim=0)  # over ground truth: [N]
        raw_matches = matches.clone() if self.allow_low_quality_matches else None
        matches[best_iou < self.low_threshold] = BELOW_LOW_THRESHOLD
        matches[(best_iou >= self.low_threshold) & (best_iou < self.high_threshold)] = BETWEEN_THRESHOLDS
        if raw_matches is not None:
            # each gt's best predictions (all ties) get back their match
            best_per_gt = match_quality.max(dim=1).values  # [G]
            is_best = ((match_quality == best_per_gt[:, None]) & (best_per_gt[:, None] > 0)).any(dim=0)  # [N]
            matches = torch.where(is_best, raw_matches, matches)
        return matches
