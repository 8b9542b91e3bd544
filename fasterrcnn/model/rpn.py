"""Region Proposal Network (Ren et al. 2015): score every anchor as object/background and regress it
into a proposal, then keep the best few thousand after NMS.

Shapes: B images, L levels, A anchors per location (same on every level), N = sum_l H_l*W_l*A anchors.
    head, per level:  features [B, C, H_l, W_l] -> objectness [B, A, H_l, W_l], deltas [B, 4A, H_l, W_l]
    flattened:        objectness [B, N], deltas [B, N, 4], in anchor order (level, y, x, anchor)
    proposals:        decoded deltas [B, N, 4] -> per image top-k per level, clip, drop small, NMS
                      (per level), keep post_nms_top_n -> B x ([P_i, 4] boxes, [P_i] scores);
                      nms_candidates gives the boxes just before NMS (for explain)
    training:         anchors matched to ground truth (IoU >= 0.7 positive, < 0.3 negative, plus each
                      gt's best anchors), 256 sampled per image (half positive at most);
                      loss_objectness = BCE over the sample, loss_rpn_box_reg = smooth-L1 (beta 1/9)
                      over the positives, summed and divided by the sample size.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..ops import BoxCoder, batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes
from .anchors import AnchorGenerator
from .matcher import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, Matcher
from .sampler import BalancedPositiveNegativeSampler, sample_generators


class RPNHead(nn.Module):
    """A 3x3 conv (+ReLU) shared by all levels, then 1x1 convs for A logits and 4A deltas."""

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1):
        super().__init__()
        # conv.0.0.weight: torchvision's layout (a stack of conv+activation blocks)
        self.conv = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(inplace=True))
            for _ in range(conv_depth)
        ])
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints from before torchvision 0.13 (its published COCO weights among them) name the
        # single conv "conv.weight"; it is our "conv.0.0.weight".
        for kind in ("weight", "bias"):
            old, new = f"{prefix}conv.{kind}", f"{prefix}conv.0.0.{kind}"
            if old in state_dict and new not in state_dict:
                state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = [], []
        for f in features:
            t = self.conv(f)
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


def flatten_head_outputs(logits: list[torch.Tensor], deltas: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-level head maps -> objectness [B, N] and deltas [B, N, 4] in anchor order (level, y, x, a)."""
    flat_logits, flat_deltas = [], []
    for lg, dl in zip(logits, deltas):
        b, a, h, w = lg.shape
        flat_logits.append(lg.permute(0, 2, 3, 1).reshape(b, -1))  # [B, A, H, W] -> [B, H*W*A]
        # [B, 4A, H, W] -> [B, A, 4, H, W] -> [B, H, W, A, 4] -> [B, H*W*A, 4]
        flat_deltas.append(dl.view(b, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4))
    return torch.cat(flat_logits, dim=1), torch.cat(flat_deltas, dim=1)


class RegionProposalNetwork(nn.Module):
    def __init__(self, anchor_generator: AnchorGenerator, head: nn.Module, *,
                 fg_iou_thresh: float = 0.7, bg_iou_thresh: float = 0.3,
                 batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                 pre_nms_top_n: dict[str, int] | None = None, post_nms_top_n: dict[str, int] | None = None,
                 nms_thresh: float = 0.7, score_thresh: float = 0.0, min_size: float = 1e-3):
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self._pre_nms_top_n = dict(pre_nms_top_n or {"training": 2000, "testing": 1000})
        self._post_nms_top_n = dict(post_nms_top_n or {"training": 2000, "testing": 1000})
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_size = min_size

    def pre_nms_top_n(self) -> int:
        return self._pre_nms_top_n["training" if self.training else "testing"]

    def post_nms_top_n(self) -> int:
        return self._post_nms_top_n["training" if self.training else "testing"]

    # ---- proposals ---------------------------------------------------------------------------
    def nms_candidates(self, proposals: torch.Tensor, objectness: torch.Tensor,
                       image_sizes: list[tuple[int, int]], num_anchors_per_level: list[int]) -> list[dict]:
        """The boxes that enter NMS, after the per-level top-k, clipping, small-box removal and the
        score threshold: per image {boxes [M, 4], scores [M] in (0, 1), levels int64 [M], counts}."""
        num_images = proposals.shape[0]
        objectness = objectness.detach()
        levels = torch.cat([
            torch.full((n,), i, dtype=torch.int64, device=proposals.device)
            for i, n in enumerate(num_anchors_per_level)
        ])
        # top-k per level (of the raw logits: the sigmoid is monotonic)
        top_idx = []
        offset = 0
        for n in num_anchors_per_level:
            k = min(self.pre_nms_top_n(), n)
            top_idx.append(objectness[:, offset:offset + n].topk(k, dim=1).indices + offset)
            offset += n
        top_idx = torch.cat(top_idx, dim=1)  # [B, K]
        batch_idx = torch.arange(num_images, device=proposals.device)[:, None]
        scores = torch.sigmoid(objectness[batch_idx, top_idx])
        boxes = proposals[batch_idx, top_idx]
        levels = levels[top_idx]

        out = []
        for b, s, lvl, size in zip(boxes, scores, levels, image_sizes):
            counts = {"anchors": int(objectness.shape[1]), "pre_nms_top_k": int(s.numel())}
            b = clip_boxes_to_image(b, size)
            keep = remove_small_boxes(b, self.min_size)
            b, s, lvl = b[keep], s[keep], lvl[keep]
            counts["after_small_box_removal"] = int(s.numel())
            keep = torch.nonzero(s >= self.score_thresh).flatten()
            b, s, lvl = b[keep], s[keep], lvl[keep]
            counts["after_score_threshold"] = int(s.numel())
            out.append({"boxes": b, "scores": s, "levels": lvl, "counts": counts})
        return out

    def filter_proposals(self, proposals: torch.Tensor, objectness: torch.Tensor,
                         image_sizes: list[tuple[int, int]], num_anchors_per_level: list[int],
                         return_stats: bool = False):
        """proposals [B, N, 4], objectness [B, N] (logits) -> B x (boxes [P_i, 4], scores [P_i] in (0, 1)).

        With return_stats, also one dict per image counting the boxes alive after each filter.
        """
        result, stats = [], []
        for c in self.nms_candidates(proposals, objectness, image_sizes, num_anchors_per_level):
            b, s, counts = c["boxes"], c["scores"], c["counts"]
            keep = batched_nms(b, s, c["levels"], self.nms_thresh)  # NMS within each level
            counts["after_nms"] = int(keep.numel())
            keep = keep[: self.post_nms_top_n()]
            counts["post_nms_top_n"] = int(keep.numel())
            result.append((b[keep], s[keep]))
            stats.append(counts)
        return (result, stats) if return_stats else result

    # ---- training targets and losses --------------------------------------------------------
    def assign_targets(self, anchors: list[torch.Tensor], targets: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per image: labels [N] (1 positive, 0 negative, -1 ignored) and matched gt boxes [N, 4]."""
        labels, matched_boxes = [], []
        for anc, tgt in zip(anchors, targets):
            gt = tgt["boxes"]
            if gt.numel() == 0:  # no objects: every anchor is a negative
                labels.append(torch.zeros(anc.shape[0], dtype=torch.float32, device=anc.device))
                matched_boxes.append(anc)  # unused (no positives), but keeps the targets finite
                continue
            matches = self.matcher(box_iou(gt, anc))
            lab = (matches >= 0).to(torch.float32)
            lab[matches == BELOW_LOW_THRESHOLD] = 0.0
            lab[matches == BETWEEN_THRESHOLDS] = -1.0
            labels.append(lab)
            matched_boxes.append(gt[matches.clamp(min=0)])
        return labels, matched_boxes

    def compute_loss(self, objectness: torch.Tensor, deltas: torch.Tensor, labels: list[torch.Tensor],
                     regression_targets: list[torch.Tensor], generators=None) -> dict[str, torch.Tensor]:
        """objectness [B, N], deltas [B, N, 4]; labels / targets per image [N], [N, 4]."""
        pos_masks, neg_masks = self.sampler(labels, generators)
        pos = torch.cat(pos_masks)
        sampled = pos | torch.cat(neg_masks)
        num_sampled = max(int(sampled.sum()), 1)
        objectness = objectness.reshape(-1)
        deltas = deltas.reshape(-1, 4)
        labels = torch.cat(labels)
        regression_targets = torch.cat(regression_targets)
        box_loss = F.smooth_l1_loss(deltas[pos], regression_targets[pos], beta=1 / 9, reduction="sum") / num_sampled
        objectness_loss = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled])
        return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}

    def forward(self, image_tensors: torch.Tensor, image_sizes: list[tuple[int, int]],
                features: dict[str, torch.Tensor], targets: list[dict] | None = None):
        """-> (proposals: B x [P_i, 4], losses: dict, empty when not training)."""
        feats = list(features.values())
        logits, deltas = self.head(feats)
        anchors = self.anchor_generator(image_tensors, feats)
        num_anchors_per_level = [lg[0].numel() for lg in logits]  # A * H_l * W_l
        objectness, deltas = flatten_head_outputs(logits, deltas)
        num_images = objectness.shape[0]
        # proposals do not backpropagate into the RPN (approximate joint training)
        proposals = self.box_coder.decode(deltas.detach().reshape(-1, 4), torch.cat(anchors))
        proposals = proposals.view(num_images, -1, 4)
        boxes = [b for b, _ in self.filter_proposals(proposals, objectness, image_sizes, num_anchors_per_level)]

        losses = {}
        if self.training:
            if targets is None:
                raise ValueError("the RPN needs targets in training mode")
            labels, matched = self.assign_targets(anchors, targets)
            regression_targets = [self.box_coder.encode(m, a) for m, a in zip(matched, anchors)]
            losses = self.compute_loss(objectness, deltas, labels, regression_targets,
                                       sample_generators(targets, stream=0))
        return boxes, losses
