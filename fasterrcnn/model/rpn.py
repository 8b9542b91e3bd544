"""Region Proposal Network (Ren et al. 2015): score every anchor as object/background and regress it
into a proposal, then keep the best few thousand after NMS.

Shapes: B images, L levels, A anchors per location (same on every level), N = sum_l H_l*W_l*A anchors.
    head, per level:  features [B, C, H_l, W_l] -> objectness [B, A, H_l, W_l], deltas [B, 4A, H_l, W_l]
    flattened:        objectness [B, N], deltas [B, N, 4], in anchor order (level, y, x, anchor)
    proposals:        decoded deltas [B, N, 4] -> per image top-k per level, clip, drop small, NMS
                      (per level), keep post_nms_top_n -> B x [P_i, 4] boxes
    training:         anchors matched to ground truth (IoU >= 0.7 positive, < 0.3 negative, plus each
                      gt's best anchors): one IoU [B, G, N] for the batch (gt padded to G);
                      256 sampled per image (half positive at most) as index tensors [B, P], [B, Q];
                      only the sampled anchors are gathered and encoded;
                      loss_objectness = BCE over the sample, loss_rpn_box_reg = smooth-L1 (beta 1/9)
                      over the positives, summed and divided by the sample size.
    recorder:         given one, the RPN writes its anchors, objectness, the boxes entering NMS with the
                      counts after each filter, the proposals and their scores, and with targets the
                      matches (and in training the sampled anchors) into it (see recorder.py).
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import BoxCoder, batched_nms, clip_boxes_to_image, min_size_mask
from .anchors import AnchorGenerator
from .box_loss import box_regression_loss, check_box_loss
from .matcher import Matcher, pad_ragged, padded_box_iou
from .per_image import top_n_per_image
from .recorder import Recorder
from .sampler import BalancedPositiveNegativeSampler, sample_generators
from .transform import ImageList


class RPNHead(nn.Module):
    """A 3x3 conv (+ReLU) shared by all levels, then 1x1 convs for A logits and 4A deltas."""

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1):
        super().__init__()
        # conv.0.0.weight: torchvision's layout (a stack of conv+activation blocks)
        self.conv = nn.Sequential(
            *[
                nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(inplace=True))
                for _ in range(conv_depth)
            ]
        )
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
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
    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: nn.Module,
        *,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        pre_nms_top_n: dict[str, int] | None = None,
        post_nms_top_n: dict[str, int] | None = None,
        nms_thresh: float = 0.7,
        score_thresh: float = 0.0,
        min_size: float = 1e-3,
        box_loss: str = "smooth_l1",
    ):
        super().__init__()
        self.box_loss = check_box_loss("rpn_box_loss", box_loss)  # model/box_loss.py
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
    # The whole batch is filtered at once: the per-level top-k, clipping, small-box and score filters
    # as masks over [B, K], then one NMS in which a box competes only with boxes of its own image and
    # level; the results are the same, box for box, as filtering each image on its own.
    def top_k_indices(
        self, objectness: torch.Tensor, num_anchors_per_level: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """objectness [B, N] (logits) -> (indices [B, K] of the best pre_nms_top_n anchors of each
        level, in level order, and their levels int64 [K]). The logits rank as the sigmoid does."""
        top_idx, levels, offset = [], [], 0
        for i, n in enumerate(num_anchors_per_level):
            k = min(self.pre_nms_top_n(), n)
            top_idx.append(objectness[:, offset : offset + n].topk(k, dim=1).indices + offset)
            levels.append(torch.full((k,), i, dtype=torch.int64, device=objectness.device))
            offset += n
        return torch.cat(top_idx, dim=1), torch.cat(levels)

    def select_proposals(
        self,
        objectness: torch.Tensor,
        deltas: torch.Tensor,
        anchors: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
        recorder: Recorder | None = None,
    ) -> list[torch.Tensor]:
        """objectness [B, N] (logits), deltas [B, N, 4], anchors B x [N, 4] -> B x proposals [P_i, 4].

        Per image: the top-k anchors of each level, decoded (only those: the others are never looked
        at), clipped to the image, those smaller than min_size or scoring below score_thresh dropped,
        NMS per level, the post_nms_top_n best kept. Decoded and ranked in float32 even when the head
        runs in bfloat16 (box coordinates need the bits); no gradient flows into the RPN (approximate
        joint training)."""
        objectness, deltas = objectness.detach().float(), deltas.detach().float()
        top_idx, levels = self.top_k_indices(objectness, num_anchors_per_level)  # [B, K], [K]
        num_images, k = top_idx.shape
        gather4 = top_idx[..., None].expand(-1, -1, 4)
        if all(a is anchors[0] for a in anchors):  # the anchor generator shares one tensor
            top_anchors = anchors[0][top_idx]
        else:
            top_anchors = torch.stack(anchors).gather(1, gather4)
        boxes = self.box_coder.decode(deltas.gather(1, gather4).reshape(-1, 4), top_anchors.reshape(-1, 4))
        scores = torch.sigmoid(objectness.gather(1, top_idx))  # [B, K]
        sizes = torch.tensor(image_sizes, dtype=boxes.dtype, device=boxes.device)  # [B, 2] (h, w)
        boxes = clip_boxes_to_image(boxes.view(num_images, k, 4), sizes[:, None, :])  # each to its own image
        not_small = min_size_mask(boxes, self.min_size)  # [B, K]
        alive = not_small & (scores >= self.score_thresh)

        flat = torch.nonzero(alive.reshape(-1)).flatten()  # (image, rank) flattened: image-major
        groups = torch.div(flat, k, rounding_mode="floor") * k + levels[flat % k]  # (image, level), distinct
        keep = flat[batched_nms(boxes.reshape(-1, 4)[flat], scores.reshape(-1)[flat], groups, self.nms_thresh)]
        keep, after_nms = top_n_per_image(
            keep, torch.div(keep, k, rounding_mode="floor"), num_images, self.post_nms_top_n()
        )
        per_image = torch.bincount(torch.div(keep, k, rounding_mode="floor"), minlength=num_images).tolist()
        proposals = list(boxes.reshape(-1, 4)[keep].split(per_image))
        if recorder is not None:
            recorder.put(
                "rpn.pre_nms",
                [{"boxes": b[ok], "scores": sc[ok], "levels": levels[ok]} for b, sc, ok in zip(boxes, scores, alive)],
            )
            recorder.put(
                "rpn.counts",
                [
                    {
                        "anchors": int(objectness.shape[1]),
                        "pre_nms_top_k": k,
                        "after_small_box_removal": int(small_ok),
                        "after_score_threshold": int(ok),
                        "after_nms": int(n),
                        "post_nms_top_n": p,
                    }
                    for small_ok, ok, n, p in zip(
                        not_small.sum(1).tolist(), alive.sum(1).tolist(), after_nms.tolist(), per_image
                    )
                ],
            )
            recorder.put("rpn.proposals", proposals)
            recorder.put("rpn.proposal_scores", list(scores.reshape(-1)[keep].split(per_image)))
            recorder.put("rpn.proposal_levels", list(levels[keep % k].split(per_image)))
        return proposals

    # ---- training targets and losses --------------------------------------------------------
    def match_anchors(
        self, anchors: list[torch.Tensor], targets: list[dict], recorder: Recorder | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (matches [B, N] int64: gt index, or -1 negative, or -2 ignored; gt boxes [B, G, 4] padded).
        One batched IoU and match for the whole batch; an image without objects gets only negatives."""
        gt, gt_valid = pad_ragged([t["boxes"] for t in targets])  # [B, G, 4], [B, G]
        batch_anchors = _batch_anchors(anchors)
        gt = gt.to(batch_anchors.dtype)
        iou = padded_box_iou(gt, gt_valid, batch_anchors[None] if batch_anchors.dim() == 2 else batch_anchors)
        matches = self.matcher(iou)
        if recorder is not None:
            recorder.put("rpn.gt_boxes", gt)
            recorder.put("rpn.iou", iou)
            recorder.put("rpn.matches", matches)
        return matches, gt

    def compute_loss(
        self,
        objectness: torch.Tensor,
        deltas: torch.Tensor,
        matches: torch.Tensor,
        gt_boxes: torch.Tensor,
        anchors: torch.Tensor,
        generators=None,
        recorder: Recorder | None = None,
    ) -> dict[str, torch.Tensor]:
        """objectness [B, N], deltas [B, N, 4], matches [B, N] and gt_boxes [B, G, 4] from
        ``match_anchors``, anchors [N, 4] or [B, N, 4]. Only the sampled anchors (at most
        batch_size_per_image per image) are gathered and encoded; both losses are sums over the
        batch's sample divided by its size."""
        # sampler labels: >= 1 positive (matched gt + 1), 0 negative, -1 ignored
        sample = self.sampler.sample(matches + 1, generators)
        if recorder is not None:
            recorder.put("rpn.sampled_positive", [i[v] for i, v in zip(sample.pos_index, sample.pos_valid)])
            recorder.put("rpn.sampled_negative", [i[v] for i, v in zip(sample.neg_index, sample.neg_valid)])
        num_sampled = sample.num_sampled().clamp(min=1)
        index = torch.cat([sample.pos_index, sample.neg_index], dim=1)  # [B, P + Q]
        valid = torch.cat([sample.pos_valid, sample.neg_valid], dim=1)
        is_pos = (matches.gather(1, index) >= 0).to(torch.float32)
        objectness_loss = (
            F.binary_cross_entropy_with_logits(
                objectness.gather(1, index).float(), is_pos, weight=valid.float(), reduction="sum"
            )
            / num_sampled
        )

        num_images = sample.pos_index.shape[0]
        pos = sample.pos_index[..., None].expand(-1, -1, 4)  # [B, P, 4]
        pos_anchors = anchors.expand(num_images, -1, -1).gather(1, pos)
        pos_gt = matches.gather(1, sample.pos_index).clamp_(min=0)[..., None].expand(-1, -1, 4)
        # a row with fewer positives than P pads with other anchors: their target is the anchor itself
        # (zero deltas, finite) and their loss is masked out
        pos_matched = torch.where(sample.pos_valid[..., None], gt_boxes.gather(1, pos_gt), pos_anchors)
        targets = self.box_coder.encode(pos_matched.reshape(-1, 4), pos_anchors.reshape(-1, 4))
        box_loss = box_regression_loss(
            self.box_loss, deltas.gather(1, pos).reshape(-1, 4), targets, pos_anchors.reshape(-1, 4), self.box_coder
        )
        box_loss = (box_loss * sample.pos_valid.reshape(-1)).sum() / num_sampled
        return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}

    def forward(
        self,
        images: ImageList,
        features: dict[str, torch.Tensor],
        targets: list[dict] | None = None,
        recorder: Recorder | None = None,
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """-> (proposals: B x [P_i, 4], losses: dict, empty when not training). Given targets outside
        training, the anchors are matched only for a recorder (no losses)."""
        if self.training and targets is None:
            raise ValueError("the RPN needs targets in training mode")
        feats = list(features.values())
        logits, deltas = self.head(feats)
        anchors = self.anchor_generator(images.tensors, feats)
        num_anchors_per_level = [lg[0].numel() for lg in logits]  # A * H_l * W_l
        if recorder is not None:
            recorder.put("rpn.anchors", anchors)
            recorder.put("rpn.num_anchors_per_level", num_anchors_per_level)
            recorder.put("rpn.objectness", [lg.detach() for lg in logits])
            recorder.put("rpn.deltas", [dl.detach() for dl in deltas])
        objectness, deltas = flatten_head_outputs(logits, deltas)
        boxes = self.select_proposals(objectness, deltas, anchors, images.image_sizes, num_anchors_per_level, recorder)

        losses = {}
        if targets is not None and (self.training or recorder is not None):
            matches, gt_boxes = self.match_anchors(anchors, targets, recorder)
            if self.training:
                losses = self.compute_loss(
                    objectness,
                    deltas,
                    matches,
                    gt_boxes,
                    _batch_anchors(anchors),
                    sample_generators(targets, stream=0),
                    recorder,
                )
        return boxes, losses


def _batch_anchors(anchors: list[torch.Tensor]) -> torch.Tensor:
    """B x [N, 4] -> [N, 4] when every image has the same tensor (the anchor generator's case: the
    batch shares one padded size), else [B, N, 4]."""
    return anchors[0] if all(a is anchors[0] for a in anchors) else torch.stack(anchors)
