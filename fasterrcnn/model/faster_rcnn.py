"""Faster R-CNN: the whole detector, from a list of images to boxes, or to the four losses.

The detector is five public stages, and ``forward`` is their composition; a caller (explain,
alternating training, a test) can run them one by one:

    images B x [3, H_i, W_i] in [0, 1]
      -> preprocess: check, normalise, resize, pad      ImageList: tensors [B, 3, Hp, Wp], image_sizes B x (H, W)
      -> features: backbone                             {name: [B, D, H_l, W_l]}
      -> propose: rpn                                   B x proposals [P_i, 4]   (+ 2 losses in training)
      -> detect: roi_heads                              B x {boxes [D_i, 4], scores, labels} (+ 2 losses)
      -> postprocess: boxes back to each original image's pixels
Training: ``model.train(); losses = model(images, targets)`` with the dict
{loss_objectness, loss_rpn_box_reg, loss_classifier, loss_box_reg}. Inference: ``model.eval();
model(images)`` -> one dict per image with boxes [D, 4] (xyxy), labels [D] int64, scores [D].
``propose`` and ``detect`` take an optional ``Recorder`` (recorder.py) into which the RPN and the RoI
heads write what they did (anchors, the boxes before NMS, matches, samples, levels, per-class boxes...).

``box_head_convs`` (channels of 3x3 conv+BN layers before one fc, e.g. (256,) * 4) replaces the
default two-fc head with the conv head, for training from scratch. The constructor takes
torchvision's keyword arguments, so a user can bring any backbone (a module
returning an ordered dict of feature maps, with ``out_channels``) and swap the anchors, the pooler,
the box head or the predictor.
"""

import copy
from collections import OrderedDict

import torch
from torch import nn

from ..ops import MultiScaleRoIAlign
from . import fast_path
from .anchors import AnchorGenerator
from .cascade import CascadePredictor, CascadeRoIHeads
from .input_checks import check_images, check_targets
from .recorder import Recorder
from .roi_heads import ConvFCHead, FastRCNNPredictor, RoIHeads, TwoMLPHead
from .rpn import RegionProposalNetwork, RPNHead
from .transform import DetectionTransform, ImageList


class FasterRCNN(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int | None = None,
        *,
        # transform
        min_size: int | tuple[int, ...] = 800,
        max_size: int = 1333,
        image_mean=(0.485, 0.456, 0.406),
        image_std=(0.229, 0.224, 0.225),
        size_divisible: int = 32,
        # RPN
        rpn_anchor_generator: AnchorGenerator | None = None,
        rpn_head: nn.Module | None = None,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_nms_thresh: float = 0.7,
        rpn_fg_iou_thresh: float = 0.7,
        rpn_bg_iou_thresh: float = 0.3,
        rpn_batch_size_per_image: int = 256,
        rpn_positive_fraction: float = 0.5,
        rpn_score_thresh: float = 0.0,
        rpn_box_loss: str = "smooth_l1",
        # box head
        box_roi_pool: nn.Module | None = None,
        box_head: nn.Module | None = None,
        box_predictor: nn.Module | None = None,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_nms: str = "nms",
        box_soft_nms_sigma: float = 0.5,
        box_soft_nms_min_score: float = 0.001,
        box_loss: str = "smooth_l1",
        cascade_iou: tuple[float, ...] = (),
        cascade_loss_weights: tuple[float, ...] = (1.0, 0.5, 0.25),
        box_detections_per_img: int = 100,
        box_fg_iou_thresh: float = 0.5,
        box_bg_iou_thresh: float = 0.5,
        box_batch_size_per_image: int = 512,
        box_positive_fraction: float = 0.25,
        bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        representation_size: int = 1024,
        box_head_convs: tuple[int, ...] = (),
    ):
        super().__init__()
        if not hasattr(backbone, "out_channels"):
            raise ValueError("the backbone must state its feature channels as backbone.out_channels")
        if (num_classes is None) == (box_predictor is None):
            raise ValueError("give exactly one of num_classes (including background) and box_predictor")
        out_channels = backbone.out_channels
        # Registration order fixes the state_dict's key order: transform, backbone, rpn, roi_heads,
        # as in torchvision's checkpoints.
        self.transform = DetectionTransform(min_size, max_size, image_mean, image_std, size_divisible)
        self.backbone = backbone

        anchor_generator = rpn_anchor_generator or AnchorGenerator()
        head = rpn_head or RPNHead(out_channels, anchor_generator.num_anchors_per_location()[0])
        self.rpn = RegionProposalNetwork(
            anchor_generator,
            head,
            fg_iou_thresh=rpn_fg_iou_thresh,
            bg_iou_thresh=rpn_bg_iou_thresh,
            batch_size_per_image=rpn_batch_size_per_image,
            positive_fraction=rpn_positive_fraction,
            pre_nms_top_n={"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
            post_nms_top_n={"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test},
            nms_thresh=rpn_nms_thresh,
            score_thresh=rpn_score_thresh,
            box_loss=rpn_box_loss,
        )

        if box_roi_pool is None:
            box_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
        if box_head is None:
            size = box_roi_pool.output_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            if box_head_convs:
                box_head = ConvFCHead(out_channels, size, tuple(box_head_convs), representation_size)
            else:
                box_head = TwoMLPHead(out_channels * size[0] * size[1], representation_size)
        common = dict(
            batch_size_per_image=box_batch_size_per_image,
            positive_fraction=box_positive_fraction,
            score_thresh=box_score_thresh,
            nms_thresh=box_nms_thresh,
            nms=box_nms,
            soft_nms_sigma=box_soft_nms_sigma,
            soft_nms_min_score=box_soft_nms_min_score,
            detections_per_img=box_detections_per_img,
            box_loss=box_loss,
        )
        if cascade_iou:  # Cascade R-CNN: one head and class-agnostic predictor per stage (model/cascade.py)
            if box_predictor is not None:
                raise ValueError("cascade_iou builds its own predictors; give num_classes, not box_predictor")
            if len(cascade_loss_weights) != len(cascade_iou):
                raise ValueError(
                    f"cascade_loss_weights needs one weight per stage of cascade_iou={list(cascade_iou)}, "
                    f"got {list(cascade_loss_weights)}"
                )
            heads = [box_head] + [copy.deepcopy(box_head) for _ in cascade_iou[1:]]
            for head in heads[1:]:
                for module in head.modules():
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
            self.roi_heads: RoIHeads = CascadeRoIHeads(
                box_roi_pool,
                heads,
                [CascadePredictor(box_head.out_features, num_classes) for _ in cascade_iou],
                iou_thresholds=tuple(cascade_iou),
                loss_weights=tuple(cascade_loss_weights),
                **common,
            )
            return
        if box_predictor is None:
            box_predictor = FastRCNNPredictor(box_head.out_features, num_classes)
        self.roi_heads = RoIHeads(
            box_roi_pool,
            box_head,
            box_predictor,
            fg_iou_thresh=box_fg_iou_thresh,
            bg_iou_thresh=box_bg_iou_thresh,
            bbox_reg_weights=bbox_reg_weights,
            **common,
        )

    @property
    def num_classes(self) -> int:
        """Number of classes including background (the predictor's output width)."""
        return self.roi_heads.box_predictor.cls_score.out_features

    def to_channels_last(self) -> "FasterRCNN":
        """Keep weights and the image batch in channels-last (NHWC) layout: the convolutions' fast path
        on CPUs (measured in docs/design-decisions.md); results are unchanged."""
        self.to(memory_format=torch.channels_last)
        self.transform.memory_format = torch.channels_last
        return self

    def optimize_for_inference(
        self,
        *,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = True,
        fuse: bool = True,
        reuse_memory: bool = True,
    ) -> "FasterRCNN":
        """Prepare this model, in place, for fast inference, and return it (``fast_path``): eval mode, every
        BatchNorm folded into the conv before it, channels-last weights and images, the RPN head's two
        output convs fused and the box head reading the pooler's channels-last rows, the activations and
        residual adds computed inside the convolutions (``fuse=False``: apart), on the CPU malloc told to keep
        freed feature maps for the next image (process-wide, ``cpu_memory``; ``reuse_memory=False``: not), and with
        ``dtype=torch.bfloat16`` the backbone, the RPN head and the box head in bfloat16 (box decoding,
        scores and NMS stay in float32).

        In float32 the detections are those of the unoptimised model up to float rounding. The
        optimised model cannot train: its norm layers are gone, so ``train()`` raises, and its
        ``state_dict`` no longer has their keys (save the checkpoint you loaded, not this one).
        """
        return fast_path.optimize_for_inference(
            self, dtype=dtype, channels_last=channels_last, fuse=fuse, reuse_memory=reuse_memory
        )

    def train(self, mode: bool = True) -> "FasterRCNN":
        if mode and getattr(self, "inference_only", False):
            raise RuntimeError(
                "this model was prepared by optimize_for_inference() (BatchNorm folded into its "
                "convolutions) and cannot train; build or load a fresh model to train"
            )
        return super().train(mode)

    # ---- the stages ------------------------------------------------------------------------------
    def preprocess(
        self, images: list[torch.Tensor], targets: list[dict] | None = None
    ) -> tuple[ImageList, list[dict] | None]:
        """Check the inputs, then normalise, resize and pad: B x [3, H_i, W_i] in [0, 1] ->
        (ImageList(tensors [B, 3, Hp, Wp], image_sizes B x (H_i', W_i') resized), targets with their
        boxes resized, or None). Targets are required in training; given in eval mode (to record the
        RPN's matches), they are checked the same way."""
        check_images(images)
        if self.training or targets is not None:
            check_targets(targets, len(images), self.num_classes)
        return self.transform(images, targets)

    def features(self, image_tensors: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """The backbone on the padded batch ``ImageList.tensors`` [B, 3, Hp, Wp] -> {name: [B, D, H_l, W_l]}
        (a backbone returning one map gives {"0": map})."""
        feats = self.backbone(image_tensors)
        return OrderedDict([("0", feats)]) if isinstance(feats, torch.Tensor) else feats

    def propose(
        self,
        images: ImageList,
        features: "OrderedDict[str, torch.Tensor]",
        targets: list[dict] | None = None,
        recorder: Recorder | None = None,
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """The RPN: -> (B x proposals [P_i, 4] in resized-image pixels, losses {loss_objectness,
        loss_rpn_box_reg} in training, else {}). Targets (resized, from ``preprocess``) are required in
        training."""
        return self.rpn(images, features, targets, recorder)

    def detect(
        self,
        features: "OrderedDict[str, torch.Tensor]",
        proposals: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict] | None = None,
        recorder: Recorder | None = None,
    ) -> tuple[list[dict], dict[str, torch.Tensor]]:
        """The RoI heads on the proposals: -> (B x {boxes [D_i, 4] (resized pixels), scores [D_i], labels
        [D_i]} in eval mode, [] in training; losses {loss_classifier, loss_box_reg} in training, else {})."""
        return self.roi_heads(features, proposals, image_sizes, targets, recorder)

    def postprocess(
        self, detections: list[dict], image_sizes: list[tuple[int, int]], original_sizes: list[tuple[int, int]]
    ) -> list[dict]:
        """Detections' boxes from each resized image (``image_sizes``) back to its original size."""
        return self.transform.postprocess(detections, image_sizes, original_sizes)

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        """The stages in order: training -> the four losses; eval -> one {boxes, labels, scores} per image."""
        image_list, targets = self.preprocess(images, targets)
        original_sizes = [tuple(im.shape[-2:]) for im in images]
        features = self.features(image_list.tensors)
        proposals, rpn_losses = self.propose(image_list, features, targets)
        detections, head_losses = self.detect(features, proposals, image_list.image_sizes, targets)
        if self.training:
            return {**rpn_losses, **head_losses}
        return self.postprocess(detections, image_list.image_sizes, original_sizes)
