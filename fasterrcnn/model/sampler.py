"""Balanced sampling of training examples: up to ``batch_size_per_image`` per image, at most
``positive_fraction`` of them positive, the rest negative (fewer positives leave room for more
negatives). Labels: >= 1 positive, 0 negative, -1 ignored.

Input:  labels, a list with one int tensor [N_i] per image.
Output: (pos_masks, neg_masks), lists of bool [N_i]; chosen uniformly at random, from torch's global
        RNG, or from a generator per image when given (see ``sample_generators``).
"""
import torch


def sample_generators(targets: list[dict] | None, stream: int) -> list[torch.Generator | None]:
    """One CPU generator per image seeded from its target's optional ``sample_seed``.

    A trainer that sets ``sample_seed`` (from the seed, the iteration and the image id) makes each
    image's sampling independent of which other images share its batch or its process, so that a run
    split over N processes draws exactly what one process with the same global batch draws.
    ``stream`` keeps the draws of the RPN (0), the RoI heads (1) and the multi-scale resize (2) apart.
    """
    if not 0 <= stream < 3:
        raise ValueError(f"stream must be 0, 1 or 2, got {stream}")
    if not targets:
        return []
    return [None if "sample_seed" not in t else
            torch.Generator().manual_seed(int(t["sample_seed"]) * 3 + stream) for t in targets]


class BalancedPositiveNegativeSampler:
    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels: list[torch.Tensor], generators: list[torch.Generator | None] | None = None
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pos_masks, neg_masks = [], []
        generators = generators or [None] * len(labels)
        for lab, gen in zip(labels, generators):
            pos = torch.nonzero(lab >= 1).flatten()
            neg = torch.nonzero(lab == 0).flatten()
            num_pos = min(pos.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(neg.numel(), self.batch_size_per_image - num_pos)
            pos = pos[_randperm(pos.numel(), gen, pos.device)[:num_pos]]
            neg = neg[_randperm(neg.numel(), gen, neg.device)[:num_neg]]
            pos_mask = torch.zeros_like(lab, dtype=torch.bool)
            neg_mask = torch.zeros_like(lab, dtype=torch.bool)
            pos_mask[pos] = True
            neg_mask[neg] = True
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks


def _randperm(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    if generator is None:
        return torch.randperm(n, device=device)
    return torch.randperm(n, generator=generator).to(device)  # a seeded CPU generator, any device
