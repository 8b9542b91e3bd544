"""A recorder: what the RPN and the RoI heads did, kept by name for whoever asks (detectron2's event storage).

Pass one to ``FasterRCNN.propose`` / ``detect`` (or to the RPN and RoI heads themselves); each writes
what it computed into it under the names below. Without a recorder nothing is recorded and nothing
extra is computed. The values are the tensors the stage computed (not copies, possibly on the GPU,
detached from autograd); per-image values are lists with one entry per image of the batch.

Shapes: B images, L levels, A anchors per location, N = sum_l A H_l W_l anchors, G ground-truth boxes
(padded to the batch's largest), K top-k candidates per image, M_i boxes entering NMS, P_i proposals,
R = sum R_i RoIs, C classes including background, D_i detections.

    rpn.anchors              B x [N, 4]          the anchors, in order (level, y, x, anchor)
    rpn.num_anchors_per_level  list[int] (L)     A * H_l * W_l
    rpn.objectness           L x [B, A, H_l, W_l] the head's logits, per level
    rpn.deltas               L x [B, 4A, H_l, W_l] the head's box deltas, per level
    rpn.pre_nms              B x {boxes [M_i, 4], scores [M_i], levels int64 [M_i]}: the boxes that
                             enter NMS (per-level top-k, clipped, not small, score >= score_thresh)
    rpn.counts               B x {anchors, pre_nms_top_k, after_small_box_removal, after_score_threshold,
                             after_nms, post_nms_top_n}: boxes alive after each filter
    rpn.proposals            B x [P_i, 4]        the proposals (the stage's output)
    rpn.proposal_scores      B x [P_i]           their objectness, in (0, 1)
    rpn.proposal_levels      B x int64 [P_i]     the RPN level each came from
    with targets:
    rpn.gt_boxes             [B, G, 4]           the ground truth, padded
    rpn.iou                  [B, G, N]           IoU of each gt box with each anchor (padding rows -1)
    rpn.matches              [B, N] int64        matched gt index, -1 negative, -2 ignored
    in training:
    rpn.sampled_positive     B x int64 [p_i]     anchors sampled as positives
    rpn.sampled_negative     B x int64 [q_i]     anchors sampled as negatives

    roi_heads.proposals      B x [R_i, 4]        the boxes pooled (in training: the sampled ones)
    in training:
    roi_heads.sampled_index  B x int64 [R_i]     each sampled box's row among the image's proposals
                                                 followed by its gt boxes
    roi_heads.sampled_labels B x int64 [R_i]     its class (0: background)
    roi_heads.pooled         [R, D, S, S]        the pooled features
    roi_heads.roi_levels     int64 [R]           the pooler's map of each RoI (poolers with ``roi_levels``)
    roi_heads.class_logits   [R, C]              the predictor's outputs
    roi_heads.box_deltas     [R, 4C]
    roi_heads.class_scores   [R, C]              softmax of the class logits
    roi_heads.boxes_per_class [R, C, 4]          each RoI's box refined for every class, clipped
    in inference:
    roi_heads.proposal_index B x int64 [D_i]     the row of the image's proposals each detection came from
"""

from typing import Any


class Recorder:
    """Name -> value, written by the model's stages. ``recorder["rpn.proposals"]``, ``"rpn.iou" in recorder``."""

    def __init__(self) -> None:
        self.records: dict[str, Any] = {}

    def put(self, name: str, value: Any) -> None:
        self.records[name] = value

    def __getitem__(self, name: str) -> Any:
        try:
            return self.records[name]
        except KeyError:
            raise KeyError(f"nothing recorded as {name!r}; recorded: {sorted(self.records)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.records

    def get(self, name: str, default: Any = None) -> Any:
        return self.records.get(name, default)

    def __len__(self) -> int:
        return len(self.records)
