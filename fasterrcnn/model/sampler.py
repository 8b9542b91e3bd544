"""Balanced sampling of training examples: up to ``batch_size_per_image`` per image, at most
``positive_fraction`` of them positive, the rest negative (fewer positives leave room for more
negatives). Labels: >= 1 positive, 0 negative, -1 ignored.

Input:  labels, a list with one int tensor [N_i] per image.
Output: (pos_masks, neg_masks), lists of bool [N_i]; chosen uniformly at random (torch's RNG).
"""
import torch


class BalancedPositiveNegativeSampler:
    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pos_masks, neg_masks = [], []
        for lab in labels:
            pos = torch.nonzero(lab >= 1).flatten()
            neg = torch.nonzero(lab == 0).flatten()
            num_pos = min(pos.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(neg.numel(), self.batch_size_per_image - num_pos)
            pos = pos[torch.randperm(pos.numel(), device=pos.device)[:num_pos]]
            neg = neg[torch.randperm(neg.numel(), device=neg.device)[:num_neg]]
            pos_mask = torch.zeros_like(lab, dtype=torch.bool)
            neg_mask = torch.zeros_like(lab, dtype=torch.bool)
            pos_mask[pos] = True
            neg_mask[neg] = True
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks
