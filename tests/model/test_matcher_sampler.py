import pytest
import torch

from fasterrcnn.model.matcher import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, Matcher
from fasterrcnn.model.sampler import BalancedPositiveNegativeSampler


def test_matcher_thresholds():
    # 2 gt x 5 predictions
    iou = torch.tensor([[0.9, 0.5, 0.2, 0.0, 0.69], [0.1, 0.6, 0.29, 0.3, 0.7]])
    m = Matcher(0.7, 0.3, allow_low_quality_matches=False)(iou)
    # pred 0 -> gt0 (0.9); pred 1 best 0.6 -> between; pred 2 best 0.29 -> below;
    # pred 3 best 0.3 -> between (low is inclusive); pred 4 best 0.7 (gt1) -> matched (high inclusive)
    assert m.tolist() == [0, BETWEEN_THRESHOLDS, BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, 1]


def test_matcher_low_quality_matches_keep_each_gts_best_including_ties():
    iou = torch.tensor([[0.4, 0.4, 0.1, 0.0], [0.0, 0.2, 0.5, 0.5]])
    m = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    # gt0's best (0.4) is tied on preds 0 and 1; gt1's best (0.5) on preds 2 and 3: all four matched
    assert m.tolist() == [0, 0, 1, 1]
    m = Matcher(0.7, 0.3, allow_low_quality_matches=False)(iou)
    assert m.tolist() == [BETWEEN_THRESHOLDS] * 4


def test_matcher_low_quality_gives_back_the_argmax_gt_not_the_claiming_one():
    # pred 1 is gt0's best (0.5) but overlaps gt1 more (0.6): it keeps its argmax, gt1
    iou = torch.tensor([[0.1, 0.5], [0.0, 0.6]])
    assert Matcher(0.7, 0.3, True)(iou).tolist() == [BELOW_LOW_THRESHOLD, 1]


def test_matcher_gt_without_any_overlap_claims_nothing():
    iou = torch.tensor([[0.0, 0.0, 0.0], [0.8, 0.1, 0.0]])
    assert Matcher(0.7, 0.3, True)(iou).tolist() == [1, BELOW_LOW_THRESHOLD, BELOW_LOW_THRESHOLD]


def test_matcher_edge_cases():
    assert Matcher(0.5, 0.5)(torch.zeros(2, 0)).numel() == 0
    with pytest.raises(ValueError, match="ground-truth"):
        Matcher(0.5, 0.5)(torch.zeros(0, 3))
    with pytest.raises(ValueError):
        Matcher(0.3, 0.7)


def test_sampler_balances_and_caps():
    labels = torch.tensor([1] * 10 + [0] * 100 + [-1] * 5)
    pos, neg = BalancedPositiveNegativeSampler(16, 0.25)([labels])
    assert int(pos[0].sum()) == 4 and int(neg[0].sum()) == 12
    assert bool((labels[pos[0]] >= 1).all()) and bool((labels[neg[0]] == 0).all())
    assert not bool((pos[0] & neg[0]).any())


def test_sampler_few_positives_fill_with_negatives_and_ignores_stay_out():
    labels = torch.tensor([2, 0, 0, 0, 0, 0, -1, -1])
    pos, neg = BalancedPositiveNegativeSampler(4, 0.5)([labels])
    assert int(pos[0].sum()) == 1 and int(neg[0].sum()) == 3
    assert not bool(pos[0][6:].any() or neg[0][6:].any())
    # fewer candidates than the batch: take them all
    pos, neg = BalancedPositiveNegativeSampler(100, 0.5)([labels])
    assert int(pos[0].sum()) == 1 and int(neg[0].sum()) == 5


def test_sampler_is_random_but_seeded():
    labels = torch.tensor([1] * 50 + [0] * 50)
    torch.manual_seed(3)
    a = BalancedPositiveNegativeSampler(10, 0.5)([labels])
    torch.manual_seed(3)
    b = BalancedPositiveNegativeSampler(10, 0.5)([labels])
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[1][0], b[1][0])


def test_sampler_with_per_image_generators_is_independent_of_batch_composition():
    from fasterrcnn.model.sampler import sample_generators

    a = torch.tensor([1] * 30 + [0] * 70)
    b = torch.tensor([1] * 5 + [0] * 95)
    sampler = BalancedPositiveNegativeSampler(20, 0.5)
    alone = sampler([b], sample_generators([{"sample_seed": 7}], 0))
    torch.manual_seed(123)  # the global RNG does not matter
    together = sampler([a, b], sample_generators([{"sample_seed": 3}, {"sample_seed": 7}], 0))
    assert torch.equal(alone[0][0], together[0][1]) and torch.equal(alone[1][0], together[1][1])
    assert sample_generators([{"boxes": None}], 0) == [None]
