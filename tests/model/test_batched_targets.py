"""The batched target assignment, sampling and losses against plain per-image references written here.

The model matches, samples and computes its losses for the whole batch at once (padded tensors, no loop
over images); each test below recomputes the same thing one image at a time, the obvious way, and
demands the same answer: exactly for labels, matches and indices, to float tolerance for losses.
"""

import pytest
import torch
import torch.nn.functional as F

from fasterrcnn.model.matcher import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, Matcher, pad_ragged, padded_box_iou
from fasterrcnn.model.roi_heads import fastrcnn_loss
from fasterrcnn.model.sampler import BalancedPositiveNegativeSampler, sample_generators
from fasterrcnn.ops import BoxCoder, box_iou

from .helpers import tiny_model


def random_boxes(n: int, g: torch.Generator, size: float = 64.0, integer: bool = True) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * size
    wh = 2 + torch.rand(n, 2, generator=g) * size / 2
    boxes = torch.cat([xy, xy + wh], dim=1)
    return boxes.round() if integer else boxes  # whole pixels: many exact IoU ties


def grid_anchors(size: int = 64, step: int = 4) -> torch.Tensor:
    """Anchors of two sizes on a grid, as an anchor generator would tile them (exact ties galore)."""
    c = torch.arange(0, size, step, dtype=torch.float32)
    cy, cx = torch.meshgrid(c, c, indexing="ij")
    out = []
    for half in (4.0, 8.0):
        out.append(torch.stack([cx - half, cy - half, cx + half, cy + half], dim=-1).reshape(-1, 4))
    return torch.cat(out)


def reference_matches(iou: torch.Tensor, high: float, low: float, low_quality: bool) -> torch.Tensor:
    """One image, [G, N] -> [N], written out rule by rule."""
    n = iou.shape[1]
    matches = torch.empty(n, dtype=torch.int64)
    for j in range(n):
        best = float(iou[:, j].max())
        g = int(iou[:, j].argmax())
        matches[j] = g if best >= high else (BELOW_LOW_THRESHOLD if best < low else BETWEEN_THRESHOLDS)
    if low_quality:
        for g in range(iou.shape[0]):
            best = float(iou[g].max())
            if best > 0:
                for j in torch.nonzero(iou[g] == best).flatten().tolist():
                    matches[j] = int(iou[:, j].argmax())
    return matches


GT_COUNTS = [(3, 0, 5), (1,), (0, 0), (4, 2)]


@pytest.mark.parametrize("gt_counts", GT_COUNTS)
def test_padded_iou_equals_box_iou_of_each_image(gt_counts):
    g = torch.Generator().manual_seed(0)
    gts = [random_boxes(k, g) for k in gt_counts]
    boxes = [random_boxes(50, g, integer=False) for _ in gt_counts]
    padded, valid = pad_ragged(gts)
    iou = padded_box_iou(padded, valid, torch.stack(boxes))
    assert iou.shape == (len(gts), max(max(gt_counts), 1), 50)
    for i, (gt, b) in enumerate(zip(gts, boxes)):
        assert torch.equal(iou[i, : gt.shape[0]], box_iou(gt, b))
        assert bool((iou[i, gt.shape[0] :] == -1).all())


@pytest.mark.parametrize("low_quality", [True, False])
@pytest.mark.parametrize("gt_counts", GT_COUNTS)
def test_batched_matcher_equals_per_image_reference(gt_counts, low_quality):
    g = torch.Generator().manual_seed(1)
    anchors = grid_anchors()
    gts = [random_boxes(k, g) for k in gt_counts]
    padded, valid = pad_ragged(gts)
    matcher = Matcher(0.7, 0.3, allow_low_quality_matches=low_quality)
    matches = matcher(padded_box_iou(padded, valid, anchors[None]))
    for i, gt in enumerate(gts):
        if gt.shape[0] == 0:
            assert bool((matches[i] == BELOW_LOW_THRESHOLD).all())
            continue
        expected = reference_matches(box_iou(gt, anchors), 0.7, 0.3, low_quality)
        assert torch.equal(matches[i], expected)
        assert torch.equal(matches[i], matcher(box_iou(gt, anchors)))  # the one-image form agrees


def anchor_labels(rpn, anchors, targets):
    """The RPN's anchor labels [B, N] (1 positive, 0 negative, -1 ignored) and matched gt boxes [B, N, 4]
    (meaningful where the label is 1), from its batched ``match_anchors``."""
    matches, gt = rpn.match_anchors(anchors, targets)
    labels = torch.where(matches >= 0, 1.0, torch.where(matches == BELOW_LOW_THRESHOLD, 0.0, -1.0))
    return labels, gt.gather(1, matches.clamp(min=0)[..., None].expand(-1, -1, 4))


@pytest.mark.parametrize("gt_counts", GT_COUNTS)
def test_rpn_matches_equal_per_image_reference(gt_counts):
    g = torch.Generator().manual_seed(2)
    rpn = tiny_model().rpn
    anchors = grid_anchors()
    targets = [{"boxes": random_boxes(k, g)} for k in gt_counts]
    labels, matched = anchor_labels(rpn, [anchors] * len(targets), targets)
    # not the same tensor object: the stacked path must agree too
    labels2, matched2 = anchor_labels(rpn, [anchors.clone() for _ in targets], targets)
    assert torch.equal(labels, labels2) and torch.equal(matched, matched2)
    for i, t in enumerate(targets):
        gt = t["boxes"]
        if gt.shape[0] == 0:
            assert bool((labels[i] == 0).all())
            continue
        m = reference_matches(box_iou(gt, anchors), 0.7, 0.3, True)
        expected = torch.where(m >= 0, 1.0, torch.where(m == BELOW_LOW_THRESHOLD, 0.0, -1.0))
        assert torch.equal(labels[i], expected)
        pos = m >= 0
        assert torch.equal(matched[i][pos], gt[m[pos]])
        assert bool(pos.any())  # low-quality matches: every gt box has an anchor


def test_rpn_loss_equals_per_image_reference_in_float64():
    """With a sampler that takes every labelled anchor, the loss is deterministic: compare it with the
    textbook per-image computation in float64."""
    g = torch.Generator().manual_seed(3)
    rpn = tiny_model(rpn_batch_size_per_image=100_000, rpn_positive_fraction=1.0).rpn
    anchors = grid_anchors()
    n = anchors.shape[0]
    targets = [{"boxes": random_boxes(k, g)} for k in (3, 0, 2)]
    objectness = torch.randn(3, n, generator=g, requires_grad=True)
    deltas = (0.1 * torch.randn(3, n, 4, generator=g)).requires_grad_()
    labels, _ = anchor_labels(rpn, [anchors] * 3, targets)
    matches, gt_boxes = rpn.match_anchors([anchors] * 3, targets)
    losses = rpn.compute_loss(objectness, deltas, matches, gt_boxes, anchors)

    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    bce, box, count = 0.0, 0.0, 0
    for i, t in enumerate(targets):
        lab = labels[i]
        sampled = lab >= 0
        count += int(sampled.sum())
        bce = bce + F.binary_cross_entropy_with_logits(
            objectness[i][sampled].double(), lab[sampled].double(), reduction="sum"
        )
        pos = lab == 1
        if pos.any():
            m = reference_matches(box_iou(t["boxes"], anchors), 0.7, 0.3, True)
            target = coder.encode(t["boxes"][m[pos]].double(), anchors[pos].double())
            box = box + F.smooth_l1_loss(deltas[i][pos].double(), target, beta=1 / 9, reduction="sum")
    torch.testing.assert_close(losses["loss_objectness"].double(), bce / count, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["loss_rpn_box_reg"].double(), box / count, rtol=1e-5, atol=1e-7)
    # the gradient reaches only sampled anchors, and every positive's deltas
    sum(losses.values()).backward()
    assert bool((objectness.grad[labels < 0] == 0).all()) and bool((objectness.grad[labels >= 0] != 0).all())
    assert bool((deltas.grad[labels != 1] == 0).all())


def test_roi_select_training_samples_equals_per_image_reference():
    """Every labelled candidate sampled (huge batch, fraction 1): the output must be, per image and as a
    set, the textbook labelling of proposals + gt boxes with their regression targets."""
    g = torch.Generator().manual_seed(4)
    heads = tiny_model(box_batch_size_per_image=100_000, box_positive_fraction=1.0).roi_heads
    proposals = [random_boxes(k, g, integer=False) for k in (40, 7, 25)]
    targets = [{"boxes": random_boxes(k, g), "labels": torch.randint(1, 4, (k,), generator=g)} for k in (3, 0, 2)]
    boxes, labels, reg = heads.select_training_samples(proposals, targets)
    for i, (props, t) in enumerate(zip(proposals, targets)):
        cand = torch.cat([props, t["boxes"]])
        if t["boxes"].shape[0]:
            m = reference_matches(box_iou(t["boxes"], cand), 0.5, 0.5, False)
            lab = torch.where(m >= 0, t["labels"][m.clamp(min=0)], 0)
            lab[m == BETWEEN_THRESHOLDS] = -1
        else:
            m = torch.full((cand.shape[0],), BELOW_LOW_THRESHOLD)
            lab = torch.zeros(cand.shape[0], dtype=torch.int64)
        keep = lab >= 0
        target = torch.zeros(cand.shape[0], 4)
        fg = lab > 0
        target[fg] = heads.box_coder.encode(t["boxes"][m[fg]], cand[fg])
        expected = torch.cat([cand[keep], lab[keep, None].float(), target[keep]], dim=1)
        got = torch.cat([boxes[i], labels[i][:, None].float(), reg[i]], dim=1)
        order = lambda x: x[torch.argsort(x[:, 0] * 1e6 + x[:, 1] * 1e3 + x[:, 2])]  # noqa: E731
        assert got.shape == expected.shape
        torch.testing.assert_close(order(got), order(expected), rtol=0, atol=1e-6)
        assert bool((labels[i][: int((labels[i] > 0).sum())] > 0).all())  # positives first


def test_roi_sampling_respects_the_budget_and_the_fraction():
    g = torch.Generator().manual_seed(5)
    heads = tiny_model(box_batch_size_per_image=16, box_positive_fraction=0.25).roi_heads
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    near = gt + torch.randn(30, 4, generator=g).clamp(-1, 1)  # 30 positives
    far = random_boxes(60, g) + 200  # background
    targets = [{"boxes": gt, "labels": torch.tensor([2])}, {"boxes": gt, "labels": torch.tensor([1])}]
    boxes, labels, _ = heads.select_training_samples([torch.cat([near, far]), far[:5]], targets)
    assert labels[0].numel() == 16 and int((labels[0] > 0).sum()) == 4
    # image 1: 1 positive (its gt box) and only 5 negatives to fill with
    assert labels[1].numel() == 6 and int((labels[1] > 0).sum()) == 1


def test_fastrcnn_loss_equals_the_foreground_selection_form():
    g = torch.Generator().manual_seed(6)
    r, k = 40, 5
    logits = torch.randn(r, k, generator=g)
    deltas = torch.randn(r, 4 * k, generator=g)
    labels = torch.randint(0, k, (r,), generator=g)
    targets = torch.randn(r, 4, generator=g)
    targets[labels == 0] = float("nan")  # background rows are never read
    losses = fastrcnn_loss(logits, deltas, labels, targets)
    fg = torch.nonzero(labels > 0).flatten()
    expected = (
        F.smooth_l1_loss(
            deltas.reshape(r, k, 4)[fg, labels[fg]].double(), targets[fg].double(), beta=1 / 9, reduction="sum"
        )
        / r
    )
    torch.testing.assert_close(losses["loss_box_reg"].double(), expected)
    torch.testing.assert_close(losses["loss_classifier"], F.cross_entropy(logits, labels))
    deltas.requires_grad_()
    fastrcnn_loss(logits, deltas, labels, targets)["loss_box_reg"].backward()
    assert torch.isfinite(deltas.grad).all()


# ---- sampler invariants -------------------------------------------------------------------------
def random_labels(lengths, g):
    out = []
    for n in lengths:
        p = torch.rand(3, generator=g)
        p = p / p.sum()
        lab = torch.searchsorted(p.cumsum(0), torch.rand(n, generator=g)).clamp(max=2) - 1  # -1, 0 or 1
        lab[lab == 1] = torch.randint(1, 3, (int((lab == 1).sum()),), generator=g)  # classes 1 and 2
        out.append(lab)
    return out


@pytest.mark.parametrize("batch,fraction", [(16, 0.25), (64, 0.5), (7, 1.0), (1000, 0.5)])
def test_sampler_invariants(batch, fraction):
    g = torch.Generator().manual_seed(7)
    lengths = [0, 5, 40, 300, 300]
    labels = random_labels(lengths, g)
    sampler = BalancedPositiveNegativeSampler(batch, fraction)
    padded, _ = pad_ragged(labels, padding_value=-1)
    sample = sampler.sample(padded, lengths=lengths)
    pos_masks, neg_masks = sampler(labels)
    for i, lab in enumerate(labels):
        num_pos = min(int((lab >= 1).sum()), int(batch * fraction))
        num_neg = min(int((lab == 0).sum()), batch - num_pos)
        pos = sample.pos_index[i][sample.pos_valid[i]]
        neg = sample.neg_index[i][sample.neg_valid[i]]
        assert pos.numel() == num_pos and neg.numel() == num_neg
        assert pos.unique().numel() == pos.numel() and neg.unique().numel() == neg.numel()
        assert bool((pos < lengths[i]).all()) and bool((neg < lengths[i]).all())  # never padding
        assert bool((lab[pos] >= 1).all()) and bool((lab[neg] == 0).all())
        # the valid entries are a prefix of each row (what the losses rely on)
        assert bool(sample.pos_valid[i][:num_pos].all()) and not bool(sample.pos_valid[i][num_pos:].any())
        assert bool(sample.neg_valid[i][:num_neg].all()) and not bool(sample.neg_valid[i][num_neg:].any())
        # the mask form agrees in counts and kinds
        assert pos_masks[i].shape == lab.shape and int(pos_masks[i].sum()) == num_pos
        assert int(neg_masks[i].sum()) == num_neg and not bool((pos_masks[i] & neg_masks[i]).any())
        assert bool((lab[pos_masks[i]] >= 1).all()) and bool((lab[neg_masks[i]] == 0).all())


def test_sampler_with_generators_is_deterministic_and_ignores_padding():
    g = torch.Generator().manual_seed(8)
    labels = random_labels([50, 300], g)
    sampler = BalancedPositiveNegativeSampler(20, 0.5)
    a = sampler(labels, sample_generators([{"sample_seed": 1}, {"sample_seed": 2}], 0))
    b = sampler(labels, sample_generators([{"sample_seed": 1}, {"sample_seed": 2}], 0))
    c = sampler(labels, sample_generators([{"sample_seed": 1}, {"sample_seed": 5}], 0))
    for x, y in zip(a, b):
        assert all(torch.equal(p, q) for p, q in zip(x, y))
    assert torch.equal(a[0][0], c[0][0]) and torch.equal(a[1][0], c[1][0])  # image 0: same seed
    assert not torch.equal(a[0][1] | a[1][1], c[0][1] | c[1][1])  # image 1: another seed, another sample
    # the same image padded further (a longer neighbour) samples the same candidates
    padded, _ = pad_ragged([labels[0], torch.full((500,), -1)], padding_value=-1)
    alone = sampler.sample(labels[0][None], sample_generators([{"sample_seed": 1}], 0))
    wide = sampler.sample(padded, sample_generators([{"sample_seed": 1}, {"sample_seed": 9}], 0), lengths=[50, 500])
    for index, valid in ((0, 1), (2, 3)):
        assert torch.equal(alone[index][0][alone[valid][0]], wide[index][0][wide[valid][0]])


def test_sampler_is_uniform_over_the_candidates():
    """Pick 1 of 4 positives and 2 of 6 negatives 4000 times: every candidate about equally often."""
    labels = torch.tensor([1] * 4 + [0] * 6)[None].expand(4000, -1)
    torch.manual_seed(9)
    pos, neg = BalancedPositiveNegativeSampler(3, 1 / 3).sample(labels).masks(10)
    pos_share = pos.float().mean(dim=0)[:4]
    neg_share = neg.float().mean(dim=0)[4:]
    assert bool(((pos_share - 0.25).abs() < 0.03).all()), pos_share
    assert bool(((neg_share - 1 / 3).abs() < 0.03).all()), neg_share
