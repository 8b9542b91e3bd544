"""The second stage (Fast R-CNN, Girshick 2015): pool a fixed-size feature for each proposal,
classify it over C+1 classes and refine its box once per class.

Shapes: B images, R_i proposals of image i (R = sum R_i), K = num_classes including background,
pooled features [R, D, P, P] (P = 7 with FPN).
    box_roi_pool:  (features, proposals, image_sizes) -> [R, D, P, P]
    box_head:      [R, D, P, P] -> [R, F]               (TwoMLPHead: fc6, fc7 with ReLU)
    box_predictor: [R, F] -> class_logits [R, K], box_deltas [R, 4K]  (deltas per class)
    training:      proposals += gt boxes; match (IoU >= 0.5 foreground, else background), the batch
                   padded to [B, N] candidates and matched at once;
                   sample 512 per image (25% foreground at most);
                   loss_classifier = cross-entropy over the sample; loss_box_reg = smooth-L1 (beta 1/9)
                   on the deltas of each foreground RoI's own class, summed / number sampled (box_loss:
                   also L1, or GIoU on the decoded boxes: box_loss.py).
    inference:     softmax, decode every class's box, clip, drop background, score > 0.05,
                   drop tiny boxes, NMS 0.5 per class (nms: or Soft-NMS), keep the top 100 per image.
    Cascade R-CNN: cascade.py's CascadeRoIHeads, this class with more stages.
    recorder:      given one, the heads write the RoIs pooled (and in training the sample), each RoI's
                   pooler level, class scores and per-class boxes, and in inference the proposal each
                   detection came from (see recorder.py).
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import BoxCoder, batched_nms, batched_soft_nms, clip_boxes_to_image, remove_small_boxes
from .box_loss import box_regression_loss, check_box_loss
from .matcher import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, Matcher, pad_ragged, padded_box_iou
from .per_image import top_n_per_image
from .recorder import Recorder
from .sampler import BalancedPositiveNegativeSampler, sample_generators


class TwoMLPHead(nn.Module):
    """Flatten, fc6 + ReLU, fc7 + ReLU: [R, D, P, P] -> [R, representation_size].

    fc6's input columns are in (channel, y, x) order, as in torchvision's checkpoints.
    """

    def __init__(self, in_channels: int, representation_size: int = 1024):
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.out_features = representation_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc6(x.flatten(start_dim=1)))
        return F.relu(self.fc7(x))


class ConvFCHead(nn.Sequential):
    """3x3 conv + BatchNorm + ReLU layers on each pooled RoI, then one fc + ReLU (the v2 box head):
    [R, D, P, P] -> [R, representation_size]. Spatial features help classification when the backbone
    is trained from scratch. The layout is torchvision's FastRCNNConvFCHead: children "0".."n-1" are the
    conv blocks (``0.0.weight`` conv, ``0.1.*`` norm), then Flatten, the fc (``<n+1>.weight``) and ReLU."""

    def __init__(
        self,
        in_channels: int,
        pool_size: tuple[int, int],
        conv_channels: tuple[int, ...] = (256,) * 4,
        representation_size: int = 1024,
    ):
        layers: list[nn.Module] = []
        c = in_channels
        for out in conv_channels:
            layers.append(
                nn.Sequential(nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True))
            )
            c = out
        layers += [nn.Flatten(), nn.Linear(c * pool_size[0] * pool_size[1], representation_size), nn.ReLU(inplace=True)]
        super().__init__(*layers)
        self.num_convs = len(conv_channels)
        self.out_features = representation_size
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Our checkpoints written before the torchvision layout: convs.<3i>.weight (conv i), convs.<3i+1>.*
        # (its norm), fc.* (the fc)
        for key in [k for k in state_dict if k.startswith((prefix + "convs.", prefix + "fc."))]:
            rel = key[len(prefix) :]
            if rel.startswith("fc."):
                new = f"{self.num_convs + 1}.{rel[len('fc.') :]}"
            else:
                _, index, rest = rel.split(".", 2)
                layer, kind = divmod(int(index), 3)
                new = f"{layer}.{kind}.{rest}"
            state_dict[prefix + new] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Res5Head(nn.Module):
    """The ResNet C4 detector's head (He et al. 2016): the network's own last stage (res5, stride 2)
    runs on each pooled RoI, then global average pooling: [R, 1024, 14, 14] -> [R, 2048]."""

    def __init__(self, layer4: nn.Module, out_features: int):
        super().__init__()
        self.layer4 = layer4
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(x).mean(dim=(2, 3))


class FastRCNNPredictor(nn.Module):
    """cls_score: [R, F] -> [R, K] logits; bbox_pred: [R, F] -> [R, 4K] class-specific deltas."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


def fastrcnn_loss(
    class_logits: torch.Tensor,
    box_deltas: torch.Tensor,
    labels: torch.Tensor,
    regression_targets: torch.Tensor,
    *,
    box_loss: str = "smooth_l1",
    proposals: torch.Tensor | None = None,
    box_coder: BoxCoder | None = None,
) -> dict[str, torch.Tensor]:
    """class_logits [R, K], box_deltas [R, 4K], labels [R] (0 = background), regression_targets [R, 4]
    (read for foreground RoIs only). Masks rather than selects the foreground: no host sync. ``box_loss``
    (model/box_loss.py): "giou" needs the RoIs' ``proposals`` [R, 4] and the ``box_coder`` to decode."""
    classification_loss = F.cross_entropy(class_logits, labels)
    num_rois = box_deltas.shape[0]
    fg = labels > 0
    # the deltas predicted for each RoI's own class: [R, K, 4] -> [R, 4] (background: class 0's, masked);
    # a class-agnostic predictor (Cascade R-CNN's) gives [R, 4] already
    if box_deltas.shape[1] == 4:
        own_deltas = box_deltas
    else:
        own_deltas = box_deltas.reshape(num_rois, -1, 4)[torch.arange(num_rois, device=labels.device), labels]
    targets = torch.where(fg[:, None], regression_targets, 0.0)  # whatever a background row holds
    if box_loss == "smooth_l1":  # the default, kept exactly as it was (in the deltas' dtype)
        per_box = F.smooth_l1_loss(own_deltas, targets.to(own_deltas.dtype), beta=1 / 9, reduction="none").sum(dim=1)
    else:
        if box_loss == "giou" and (proposals is None or box_coder is None):
            raise ValueError("fastrcnn_loss: box_loss='giou' needs the proposals and the box coder")
        refs = proposals if proposals is not None else torch.zeros_like(targets)
        per_box = box_regression_loss(box_loss, own_deltas, targets, refs, box_coder or BoxCoder((1.0, 1.0, 1.0, 1.0)))
    per_box = torch.where(fg, per_box, 0.0).sum()
    return {"loss_classifier": classification_loss, "loss_box_reg": per_box / max(labels.numel(), 1)}


NMS_METHODS = ("nms", "soft_linear", "soft_gaussian")


class RoIHeads(nn.Module):
    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_head: nn.Module,
        box_predictor: nn.Module,
        *,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        nms: str = "nms",
        soft_nms_sigma: float = 0.5,
        soft_nms_min_score: float = 0.001,
        detections_per_img: int = 100,
        box_loss: str = "smooth_l1",
    ):
        super().__init__()
        self.box_loss = check_box_loss("box_loss", box_loss)  # model/box_loss.py
        if nms not in NMS_METHODS:
            raise ValueError(f"box_nms must be one of {', '.join(NMS_METHODS)}, got {nms!r}")
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.box_coder = BoxCoder(weights=bbox_reg_weights)
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        # "nms": greedy NMS at nms_thresh; "soft_linear" / "soft_gaussian": Soft-NMS (ops/soft_nms.py), the scores
        # of overlapping boxes decayed (linear: by 1 - IoU above nms_thresh; gaussian: exp(-IoU^2 / sigma)) and the
        # boxes dropped below soft_nms_min_score
        self.nms = nms
        self.soft_nms_sigma = soft_nms_sigma
        self.soft_nms_min_score = soft_nms_min_score
        self.detections_per_img = detections_per_img

    # ---- training ----------------------------------------------------------------------------
    def select_training_samples(
        self, proposals: list[torch.Tensor], targets: list[dict], recorder: Recorder | None = None
    ):
        """Add the gt boxes to the proposals, label them and sample, for the whole batch at once.

        -> (proposals B x [S_i, 4], labels B x [S_i], regression_targets B x [S_i, 4]); each image's
        sampled positives come first, then its negatives (labels 0, regression targets 0).
        """
        gt_boxes = [t["boxes"].to(p.dtype) for t, p in zip(targets, proposals)]
        # each image's candidates, its proposals then its gt boxes, are a prefix of its row: [B, N, 4]
        candidates, valid = pad_ragged([torch.cat([p, g]) for p, g in zip(proposals, gt_boxes)])
        gt, gt_valid = pad_ragged(gt_boxes)  # [B, G, 4]
        gt_labels, _ = pad_ragged([t["labels"] for t in targets])  # [B, G]
        matches = self.matcher(padded_box_iou(gt, gt_valid, candidates))  # [B, N]
        matched = matches.clamp(min=0)
        labels = torch.where(matches == BELOW_LOW_THRESHOLD, 0, gt_labels.gather(1, matched))
        labels = torch.where((matches == BETWEEN_THRESHOLDS) | ~valid, -1, labels)  # padding: ignored

        lengths = [p.shape[0] + g.shape[0] for p, g in zip(proposals, gt_boxes)]
        sample = self.sampler.sample(labels, sample_generators(targets, stream=1), lengths)
        index = torch.cat([sample.pos_index, sample.neg_index], dim=1)  # [B, P + Q]
        keep = torch.cat([sample.pos_valid, sample.neg_valid], dim=1)
        # the pooler takes one box list per image: this is the step's one host sync
        counts = keep.sum(dim=1).tolist()
        rows = torch.arange(len(proposals), device=index.device)[:, None].expand_as(index)[keep]
        cols = index[keep]
        boxes, labels = candidates[rows, cols], labels[rows, cols]
        matched_boxes = torch.where((labels > 0)[:, None], gt[rows, matched[rows, cols]], boxes)
        regression_targets = self.box_coder.encode(matched_boxes, boxes)
        if recorder is not None:
            recorder.put("roi_heads.sampled_index", list(cols.split(counts)))
            recorder.put("roi_heads.sampled_labels", list(labels.split(counts)))
        return list(boxes.split(counts)), list(labels.split(counts)), list(regression_targets.split(counts))

    # ---- inference ---------------------------------------------------------------------------
    def postprocess_detections(
        self,
        class_logits: torch.Tensor,
        box_deltas: torch.Tensor,
        proposals: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
        recorder: Recorder | None = None,
        box_coder: BoxCoder | None = None,
    ) -> list[dict]:
        """-> B x {boxes, scores, labels}; a recorder gets, per image, the row of the image's proposals
        each detection was refined from (``roi_heads.proposal_index``). ``box_coder``: the one that decodes the
        deltas (default this head's; the cascade's last stage has its own).

        The whole batch at once: a candidate is a (proposal, class) pair scoring above score_thresh
        (background excluded), in that row-major order; only candidates are decoded (in float32, even
        from a bfloat16 head) and clipped to their image; one NMS runs in which a box competes only
        with boxes of its own image and class; each image keeps its detections_per_img best. The same
        detections as processing each image on its own."""
        class_logits, box_deltas = class_logits.float(), box_deltas.float()
        num_rois, num_classes = class_logits.shape
        boxes_per_image = [p.shape[0] for p in proposals]
        device = class_logits.device
        scores = F.softmax(class_logits, dim=-1)
        rows, labels = torch.nonzero(scores[:, 1:] > self.score_thresh).unbind(1)  # [M] each, row-major
        labels = labels + 1
        scores = scores[rows, labels]
        boxes = (box_coder or self.box_coder).decode(
            box_deltas.view(num_rois, num_classes, 4)[rows, labels], torch.cat(proposals).to(torch.float32)[rows]
        )
        counts = torch.tensor(boxes_per_image, device=device)
        image = torch.repeat_interleave(torch.arange(len(proposals), device=device), counts, output_size=num_rois)[
            rows
        ]  # [M]
        sizes = torch.tensor(image_sizes, dtype=boxes.dtype, device=device)  # [B, 2] (h, w)
        boxes = clip_boxes_to_image(boxes, sizes[image])  # each box to its own image
        ok = remove_small_boxes(boxes, 1e-2)
        boxes, scores, labels, rows, image = boxes[ok], scores[ok], labels[ok], rows[ok], image[ok]
        groups = image * num_classes + labels
        if self.nms == "nms":
            keep = batched_nms(boxes, scores, groups, self.nms_thresh)  # by score
        else:  # by decayed score; the kept boxes get their decayed scores
            keep, decayed = batched_soft_nms(
                boxes,
                scores,
                groups,
                method=self.nms.removeprefix("soft_"),
                sigma=self.soft_nms_sigma,
                iou_threshold=self.nms_thresh,
                score_threshold=self.soft_nms_min_score,
            )
            scores = scores.clone()
            scores[keep] = decayed.to(scores.dtype)
        keep, _ = top_n_per_image(keep, image[keep], len(proposals), self.detections_per_img)
        per_image = torch.bincount(image[keep], minlength=len(proposals)).tolist()
        if recorder is not None:
            first_row = torch.cumsum(counts, 0) - counts
            recorder.put("roi_heads.proposal_index", list((rows[keep] - first_row[image[keep]]).split(per_image)))
        return [
            {"boxes": b, "scores": s, "labels": lb}
            for b, s, lb in zip(
                boxes[keep].split(per_image), scores[keep].split(per_image), labels[keep].split(per_image)
            )
        ]

    def record(
        self,
        recorder: Recorder,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
        pooled: torch.Tensor,
        class_logits: torch.Tensor,
        box_deltas: torch.Tensor,
        box_coder: BoxCoder | None = None,
    ) -> None:
        """What the second stage made of each RoI: its pooler level, its class scores and its box refined
        for every class (clipped to its image). Work done only for a recorder."""
        recorder.put("roi_heads.proposals", proposals)
        recorder.put("roi_heads.pooled", pooled.detach())
        if hasattr(self.box_roi_pool, "roi_levels"):
            recorder.put("roi_heads.roi_levels", self.box_roi_pool.roi_levels(features, proposals, image_sizes))
        recorder.put("roi_heads.class_logits", class_logits.detach())
        recorder.put("roi_heads.box_deltas", box_deltas.detach())
        class_logits, box_deltas = class_logits.detach().float(), box_deltas.detach().float()
        num_rois, num_classes = class_logits.shape
        recorder.put("roi_heads.class_scores", F.softmax(class_logits, dim=-1))
        rois = torch.cat(proposals).to(torch.float32) if proposals else box_deltas.new_zeros((0, 4))
        refined = (box_coder or self.box_coder).decode(box_deltas, rois).view(num_rois, num_classes, 4)
        sizes = torch.tensor(image_sizes, dtype=refined.dtype, device=refined.device)  # [B, 2] (h, w)
        image = torch.repeat_interleave(
            torch.arange(len(proposals), device=refined.device),
            torch.tensor([p.shape[0] for p in proposals], device=refined.device),
            output_size=num_rois,
        )
        recorder.put("roi_heads.boxes_per_class", clip_boxes_to_image(refined, sizes[image][:, None, :]))

    def forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict] | None = None,
        recorder: Recorder | None = None,
    ):
        """-> (detections: B x {boxes, scores, labels} (empty list in training), losses dict)."""
        if self.training:
            if targets is None:
                raise ValueError("the RoI heads need targets in training mode")
            proposals, labels, regression_targets = self.select_training_samples(proposals, targets, recorder)
        # bfloat16 maps (optimize_for_inference) are pooled as they are, with the boxes in float32
        pooled = self.box_roi_pool(features, proposals, image_sizes)
        class_logits, box_deltas = self.box_predictor(self.box_head(pooled))
        if recorder is not None:
            self.record(recorder, features, proposals, image_sizes, pooled, class_logits, box_deltas)
        if self.training:
            losses = fastrcnn_loss(
                class_logits,
                box_deltas,
                torch.cat(labels),
                torch.cat(regression_targets),
                box_loss=self.box_loss,
                proposals=torch.cat(proposals),
                box_coder=self.box_coder,
            )
            return [], losses
        return self.postprocess_detections(class_logits, box_deltas, proposals, image_sizes, recorder), {}
