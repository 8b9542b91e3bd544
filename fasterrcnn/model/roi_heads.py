"""The second stage (Fast R-CNN, Girshick 2015): pool a fixed-size feature for each proposal,
classify it over C+1 classes and refine its box once per class.

Shapes: B images, R_i proposals of image i (R = sum R_i), K = num_classes including background,
pooled features [R, D, P, P] (P = 7 with FPN).
    box_roi_pool:  (features, proposals, image_sizes) -> [R, D, P, P]
    box_head:      [R, D, P, P] -> [R, F]               (TwoMLPHead: fc6, fc7 with ReLU)
    box_predictor: [R, F] -> class_logits [R, K], box_deltas [R, 4K]  (deltas per class)
    training:      proposals += gt boxes; match (IoU >= 0.5 foreground, else background);
                   sample 512 per image (25% foreground at most);
                   loss_classifier = cross-entropy over the sample; loss_box_reg = smooth-L1 (beta 1/9)
                   on the deltas of each foreground RoI's own class, summed / number sampled.
    inference:     softmax, decode every class's box, clip, drop background, score > 0.05,
                   drop tiny boxes, NMS 0.5 per class, keep the top 100 per image.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..ops import BoxCoder, batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes
from .matcher import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, Matcher
from .sampler import BalancedPositiveNegativeSampler, sample_generators


class TwoMLPHead(nn.Module):
    """Flatten, fc6 + ReLU, fc7 + ReLU: [R, D, P, P] -> [R, representation_size]."""

    def __init__(self, in_channels: int, representation_size: int = 1024):
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.out_features = representation_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc6(x.flatten(start_dim=1)))
        return F.relu(self.fc7(x))


class ConvFCHead(nn.Module):
    """3x3 conv + BatchNorm + ReLU layers on each pooled RoI, then one fc + ReLU (the v2 box head's
    form): [R, D, P, P] -> [R, representation_size]. Spatial features help classification when the
    backbone is trained from scratch."""

    def __init__(self, in_channels: int, pool_size: tuple[int, int], conv_channels: tuple[int, ...] = (256,) * 4,
                 representation_size: int = 1024):
        super().__init__()
        layers, c = [], in_channels
        for out in conv_channels:
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            c = out
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(c * pool_size[0] * pool_size[1], representation_size)
        self.out_features = representation_size
        for m in self.convs.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.convs(x).flatten(start_dim=1)))


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


def fastrcnn_loss(class_logits: torch.Tensor, box_deltas: torch.Tensor, labels: torch.Tensor,
                  regression_targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """class_logits [R, K], box_deltas [R, 4K], labels [R] (0 = background), regression_targets [R, 4]."""
    classification_loss = F.cross_entropy(class_logits, labels)
    fg = torch.nonzero(labels > 0).flatten()
    # the deltas predicted for each foreground RoI's own class: [R, K, 4] -> [n_fg, 4]
    fg_deltas = box_deltas.reshape(box_deltas.shape[0], -1, 4)[fg, labels[fg]]
    box_loss = F.smooth_l1_loss(fg_deltas, regression_targets[fg], beta=1 / 9, reduction="sum")
    return {"loss_classifier": classification_loss, "loss_box_reg": box_loss / max(labels.numel(), 1)}


class RoIHeads(nn.Module):
    def __init__(self, box_roi_pool: nn.Module, box_head: nn.Module, box_predictor: nn.Module, *,
                 fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.5,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                 bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100):
        super().__init__()
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.box_coder = BoxCoder(weights=bbox_reg_weights)
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    # ---- training ----------------------------------------------------------------------------
    def select_training_samples(self, proposals: list[torch.Tensor], targets: list[dict]):
        """Add the gt boxes to the proposals, label them and sample.

        -> (proposals B x [S_i, 4], labels B x [S_i], regression_targets B x [S_i, 4])
        """
        out_props, out_labels, out_targets = [], [], []
        for props, tgt, gen in zip(proposals, targets, sample_generators(targets, stream=1)):
            gt_boxes, gt_labels = tgt["boxes"].to(props.dtype), tgt["labels"]
            props = torch.cat([props, gt_boxes])
            if gt_boxes.numel() == 0:
                labels = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
                matched = props  # unused (no foreground), but keeps the regression targets finite
            else:
                matches = self.matcher(box_iou(gt_boxes, props))
                labels = gt_labels[matches.clamp(min=0)].clone()
                labels[matches == BELOW_LOW_THRESHOLD] = 0
                labels[matches == BETWEEN_THRESHOLDS] = -1
                matched = gt_boxes[matches.clamp(min=0)]
            (pos,), (neg,) = self.sampler([labels], [gen])
            keep = torch.nonzero(pos | neg).flatten()
            out_props.append(props[keep])
            out_labels.append(labels[keep])
            out_targets.append(self.box_coder.encode(matched[keep], props[keep]))
        return out_props, out_labels, out_targets

    # ---- inference ---------------------------------------------------------------------------
    def postprocess_detections(self, class_logits: torch.Tensor, box_deltas: torch.Tensor,
                               proposals: list[torch.Tensor], image_sizes: list[tuple[int, int]],
                               return_proposal_index: bool = False) -> list[dict]:
        """-> B x {boxes, scores, labels}; with return_proposal_index also proposal_index int64 [D]:
        the row of the image's proposals each detection was refined from."""
        num_classes = class_logits.shape[-1]
        boxes_per_image = [p.shape[0] for p in proposals]
        # every class's refined box for every proposal: [R, 4K] -> [R, K, 4]
        pred_boxes = self.box_coder.decode(box_deltas, torch.cat(proposals)).reshape(-1, num_classes, 4)
        pred_scores = F.softmax(class_logits, dim=-1)
        results = []
        for boxes, scores, size in zip(pred_boxes.split(boxes_per_image), pred_scores.split(boxes_per_image),
                                       image_sizes):
            boxes = clip_boxes_to_image(boxes, size)
            labels = torch.arange(num_classes, device=boxes.device).expand_as(scores)
            # drop the background column, then one candidate per (proposal, class)
            rows = torch.arange(boxes.shape[0], device=boxes.device)[:, None].expand_as(labels)  # proposal index
            boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            rows = rows[:, 1:].reshape(-1)
            keep = torch.nonzero(scores > self.score_thresh).flatten()
            boxes, scores, labels, rows = boxes[keep], scores[keep], labels[keep], rows[keep]
            keep = remove_small_boxes(boxes, 1e-2)
            boxes, scores, labels, rows = boxes[keep], scores[keep], labels[keep], rows[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            result = {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
            if return_proposal_index:
                result["proposal_index"] = rows[keep]
            results.append(result)
        return results

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_sizes: list[tuple[int, int]], targets: list[dict] | None = None):
        """-> (detections: B x {boxes, scores, labels} (empty list in training), losses dict)."""
        if self.training:
            if targets is None:
                raise ValueError("the RoI heads need targets in training mode")
            proposals, labels, regression_targets = self.select_training_samples(proposals, targets)
        pooled = self.box_roi_pool(features, proposals, image_sizes)
        class_logits, box_deltas = self.box_predictor(self.box_head(pooled))
        if self.training:
            losses = fastrcnn_loss(class_logits, box_deltas, torch.cat(labels), torch.cat(regression_targets))
            return [], losses
        return self.postprocess_detections(class_logits, box_deltas, proposals, image_sizes), {}
