"""Balanced sampling of training examples: up to ``batch_size_per_image`` per image, at most
``positive_fraction`` of them positive, the rest negative (fewer positives leave room for more
negatives). Labels: >= 1 positive, 0 negative, -1 ignored.

Shapes: B images, N candidates (anchors or proposals; padding is labelled -1), P = min(N, the
positive cap), Q = min(N, batch_size_per_image).
    sample:   labels [B, N] -> Sample(pos_index [B, P], pos_valid [B, P], neg_index [B, Q], neg_valid [B, Q])
              the valid entries of a row are that image's sampled positives (negatives), distinct
    __call__: labels B x [N_i] -> (pos_masks B x bool [N_i], neg_masks B x bool [N_i])

How: every candidate gets an independent uniform random key; an image takes its P lowest-keyed
positives (all of them when it has fewer) and, of its negatives, the lowest-keyed ones up to
``batch_size_per_image`` minus its positives. Lowest keys of i.i.d. uniforms are a uniformly random
subset, the draw of ``torch.randperm`` per image, but the whole batch is two ``topk`` calls with fixed
shapes: no loop over images, no ``nonzero``, no host sync. Keys are float64, so ties (which would
favour lower indices) practically never happen among 10^5 candidates.

Randomness: torch's global RNG, or one generator per image (see ``sample_generators``); an image's
keys then come from its own generator only and number exactly its own candidates, so its sample does
not depend on the other images of the batch or on the padding.
"""

from typing import NamedTuple

import torch

from .matcher import pad_ragged


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
    return [
        None if "sample_seed" not in t else torch.Generator().manual_seed(int(t["sample_seed"]) * 3 + stream)
        for t in targets
    ]


class Sample(NamedTuple):
    """Sampled candidates per image, as fixed-size index tensors with a validity mask."""

    pos_index: torch.Tensor  # int64 [B, P]
    pos_valid: torch.Tensor  # bool [B, P]
    neg_index: torch.Tensor  # int64 [B, Q]
    neg_valid: torch.Tensor  # bool [B, Q]

    def masks(self, num_candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (pos, neg) bool [B, N]."""
        pos = torch.zeros(self.pos_index.shape[0], num_candidates, dtype=torch.bool, device=self.pos_index.device)
        neg = torch.zeros_like(pos)
        return pos.scatter_(1, self.pos_index, self.pos_valid), neg.scatter_(1, self.neg_index, self.neg_valid)

    def num_sampled(self) -> torch.Tensor:
        """Sampled candidates over the whole batch, as a tensor (no host sync)."""
        return self.pos_valid.sum() + self.neg_valid.sum()


class BalancedPositiveNegativeSampler:
    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def sample(
        self,
        labels: torch.Tensor,
        generators: list[torch.Generator | None] | None = None,
        lengths: list[int] | None = None,
    ) -> Sample:
        """labels [B, N]; ``lengths``: the real candidates of each image, a prefix of its row (the
        rest is padding, labelled -1), needed only to draw per-image generators' keys (default N)."""
        num_images, n = labels.shape
        keys = random_keys(num_images, n, generators, lengths, labels.device)
        num_pos_cap = int(self.batch_size_per_image * self.positive_fraction)
        is_pos, is_neg = labels >= 1, labels == 0

        pos_keys, pos_index = torch.where(is_pos, keys, torch.inf).topk(min(num_pos_cap, n), dim=1, largest=False)
        pos_valid = pos_keys < torch.inf  # rows with fewer positives than the cap end in non-positives
        room = self.batch_size_per_image - pos_valid.sum(dim=1, keepdim=True)  # [B, 1]
        q = min(self.batch_size_per_image, n)
        neg_keys, neg_index = torch.where(is_neg, keys, torch.inf).topk(q, dim=1, largest=False)  # sorted
        rank = torch.arange(q, device=labels.device)[None, :]
        neg_valid = (neg_keys < torch.inf) & (rank < room)
        return Sample(pos_index, pos_valid, neg_index, neg_valid)

    def __call__(
        self, labels: list[torch.Tensor], generators: list[torch.Generator | None] | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-image label vectors -> per-image (positive mask, negative mask)."""
        lengths = [lab.shape[0] for lab in labels]
        padded, _ = pad_ragged(labels, padding_value=-1)
        pos, neg = self.sample(padded, generators, lengths).masks(padded.shape[1])
        return ([p[:k] for p, k in zip(pos, lengths)], [m[:k] for m, k in zip(neg, lengths)])


def random_keys(
    num_images: int,
    n: int,
    generators: list[torch.Generator | None] | None,
    lengths: list[int] | None,
    device: torch.device,
) -> torch.Tensor:
    """Uniform float64 keys [B, N]: from the global RNG on ``device``, or, for an image with a
    generator, its first ``lengths[i]`` keys from that (CPU) generator and +inf for the padding."""
    if not generators or all(g is None for g in generators):
        return torch.rand(num_images, n, dtype=torch.float64, device=device)
    lengths = lengths or [n] * num_images
    rows = [
        torch.rand(k, dtype=torch.float64, generator=g)
        if g is not None
        else torch.rand(k, dtype=torch.float64, device=device)
        for g, k in zip(generators, lengths)
    ]
    return pad_ragged([r.to(device) for r in rows], min_length=n, padding_value=torch.inf)[0]
