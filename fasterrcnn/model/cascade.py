"""Cascade R-CNN (Cai and Vasconcelos, CVPR 2018): the second stage as a sequence of stages, each refining the
boxes of the one before and trained at a rising IoU threshold.

Shapes: B images, R RoIs (the same rows through every stage), C = num_classes including background,
S stages, pooled features [R, D, P, P].
    stage k:     box_roi_pool(features, boxes_k) -> head_k -> predictor_k -> class_logits [R, C], deltas [R, 4]
                 (class-agnostic: one box per RoI), decoded with stage k's BoxCoder weights (10, 10, 5, 5) x (k + 1)
                 into boxes_{k+1} (clipped, no gradient back through them).
    training:    stage 0 samples as Fast R-CNN does (RoIHeads.select_training_samples, IoU >= iou[0]); stage k > 0
                 re-labels the refined boxes of the same RoIs at IoU >= iou[k] (no resampling: the rising
                 quality of the boxes keeps enough positives); losses: sum_k weight_k * (cross-entropy, box loss)
                 into loss_classifier and loss_box_reg (the paper's weights 1, 0.5, 0.25).
    inference:   each stage's class probabilities for its own input boxes, averaged over the stages; the
                 boxes of the last stage; then RoIHeads' post-processing (score threshold, NMS, top 100).
    recorder:    ``roi_heads.cascade_boxes``: per stage (its input boxes, then the last stage's output),
                 B x [R_i, 4], so explain can draw what each stage did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import BoxCoder, clip_boxes_to_image
from .matcher import BELOW_LOW_THRESHOLD, Matcher, pad_ragged, padded_box_iou
from .recorder import Recorder
from .roi_heads import RoIHeads, fastrcnn_loss


class CascadePredictor(nn.Module):
    """[R, F] -> class_logits [R, C], deltas [R, 4]: one class-agnostic box per RoI."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


def stage_weights(k: int) -> tuple[float, float, float, float]:
    """The BoxCoder weights of stage k (0-based): the paper's (10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)."""
    return (10.0 * (k + 1), 10.0 * (k + 1), 5.0 * (k + 1), 5.0 * (k + 1))


class CascadeRoIHeads(RoIHeads):
    """RoIHeads whose stage 0 is its own box_head / box_predictor / matcher / box_coder, followed by
    ``later_heads`` and ``later_predictors`` (stages 1..S-1), each with its IoU threshold and BoxCoder."""

    def __init__(
        self,
        box_roi_pool: nn.Module,
        heads: list[nn.Module],
        predictors: list[nn.Module],
        *,
        iou_thresholds: tuple[float, ...],
        loss_weights: tuple[float, ...],
        **kwargs,
    ):
        if not len(heads) == len(predictors) == len(iou_thresholds) == len(loss_weights) >= 2:
            raise ValueError(
                f"a cascade needs at least two stages and one head, predictor, IoU threshold and loss weight per "
                f"stage; got {len(heads)}, {len(predictors)}, {len(iou_thresholds)}, {len(loss_weights)}"
            )
        kwargs.update(fg_iou_thresh=iou_thresholds[0], bg_iou_thresh=iou_thresholds[0])
        super().__init__(box_roi_pool, heads[0], predictors[0], bbox_reg_weights=stage_weights(0), **kwargs)
        self.later_heads = nn.ModuleList(heads[1:])
        self.later_predictors = nn.ModuleList(predictors[1:])
        self.iou_thresholds = tuple(float(t) for t in iou_thresholds)
        self.stage_loss_weights = tuple(float(w) for w in loss_weights)
        self.coders = [self.box_coder] + [BoxCoder(weights=stage_weights(k)) for k in range(1, len(heads))]
        self.matchers = [self.matcher] + [Matcher(t, t, allow_low_quality_matches=False) for t in iou_thresholds[1:]]

    @property
    def num_stages(self) -> int:
        return 1 + len(self.later_heads)

    def stage(self, k: int) -> tuple[nn.Module, nn.Module]:
        if k == 0:
            return self.box_head, self.box_predictor
        return self.later_heads[k - 1], self.later_predictors[k - 1]

    def label_stage(self, k: int, boxes: list[torch.Tensor], targets: list[dict]):
        """Stage k's labels and regression targets for ``boxes`` (all of them, no sampling): the matched object's
        class at IoU >= iou[k], else background (0)."""
        gt_boxes = [t["boxes"].to(b.dtype) for t, b in zip(targets, boxes)]
        candidates, valid = pad_ragged(boxes)
        gt, gt_valid = pad_ragged(gt_boxes)
        gt_labels, _ = pad_ragged([t["labels"] for t in targets])
        matches = self.matchers[k](padded_box_iou(gt, gt_valid, candidates))  # [B, N]
        matched = matches.clamp(min=0)
        labels = torch.where(matches == BELOW_LOW_THRESHOLD, 0, gt_labels.gather(1, matched))
        labels = torch.where(matches < 0, 0, labels)  # fg == bg threshold: nothing is "between"
        rows, cols = torch.nonzero(valid, as_tuple=True)
        labels = labels[rows, cols]
        flat = candidates[rows, cols]
        matched_boxes = torch.where((labels > 0)[:, None], gt[rows, matched[rows, cols]], flat)
        regression_targets = self.coders[k].encode(matched_boxes, flat)
        counts = [len(b) for b in boxes]
        return list(labels.split(counts)), list(regression_targets.split(counts))

    def refine(self, k: int, deltas: torch.Tensor, boxes: list[torch.Tensor], image_sizes) -> list[torch.Tensor]:
        """Stage k's boxes for the next stage: decoded, clipped to their image, detached."""
        counts = [len(b) for b in boxes]
        rois = torch.cat(boxes).to(torch.float32)
        refined = self.coders[k].decode(deltas.detach().float(), rois)
        out = []
        for part, (h, w) in zip(refined.split(counts), image_sizes):
            out.append(clip_boxes_to_image(part, (h, w)))
        return out

    def forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict] | None = None,
        recorder: Recorder | None = None,
    ):
        """-> (detections: B x {boxes, scores, labels} (empty list in training), losses dict)."""
        labels: list[torch.Tensor] = []
        regression_targets: list[torch.Tensor] = []
        if self.training:
            if targets is None:
                raise ValueError("the RoI heads need targets in training mode")
            proposals, labels, regression_targets = self.select_training_samples(proposals, targets, recorder)
        boxes = proposals
        stage_boxes = [boxes]
        losses: dict[str, torch.Tensor] = {}
        probabilities = []
        pooled = torch.empty(0)
        class_logits: torch.Tensor | None = None
        box_deltas: torch.Tensor | None = None
        for k in range(self.num_stages):
            if k > 0:
                assert box_deltas is not None
                boxes = self.refine(k - 1, box_deltas, boxes, image_sizes)
                stage_boxes.append(boxes)
                if self.training:
                    assert targets is not None
                    labels, regression_targets = self.label_stage(k, boxes, targets)
            head, predictor = self.stage(k)
            pooled = self.box_roi_pool(features, boxes, image_sizes)
            class_logits, box_deltas = predictor(head(pooled))
            if self.training:
                stage_losses = fastrcnn_loss(
                    class_logits,
                    box_deltas,
                    torch.cat(labels),
                    torch.cat(regression_targets),
                    box_loss=self.box_loss,
                    proposals=torch.cat(boxes),
                    box_coder=self.coders[k],
                )
                for name, value in stage_losses.items():
                    losses[name] = losses.get(name, 0.0) + self.stage_loss_weights[k] * value
            else:
                probabilities.append(F.softmax(class_logits.float(), dim=-1))
        if self.training:
            return [], losses
        assert class_logits is not None and box_deltas is not None
        # the stages' averaged probabilities as logits (softmax of their log is themselves), the last stage's box
        # for every class, decoded by the last stage's coder
        scores = torch.stack(probabilities).mean(dim=0)
        num_classes = scores.shape[1]
        logits, deltas = scores.clamp(min=1e-12).log(), box_deltas.float().repeat(1, num_classes)
        if recorder is not None:  # RoIHeads' records (of the last stage), the RPN's proposals, every stage's boxes
            self.record(recorder, features, boxes, image_sizes, pooled, logits, deltas, box_coder=self.coders[-1])
            recorder.put("roi_heads.proposals", proposals)
            last = self.refine(self.num_stages - 1, box_deltas, boxes, image_sizes)
            recorder.put("roi_heads.cascade_boxes", [*stage_boxes, last])
        detections = self.postprocess_detections(
            logits, deltas, boxes, image_sizes, recorder, box_coder=self.coders[-1]
        )
        return detections, {}
