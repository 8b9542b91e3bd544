"""The batched inference path (RPN proposal filtering, box post-processing, anchors, FPN top-down)
against the plain per-image procedure, written out here with the elementary ops: the same boxes,
bit for bit, in the same order."""

from collections import OrderedDict

import torch
import torch.nn.functional as F

from fasterrcnn.model.fpn import FeaturePyramidNetwork
from fasterrcnn.model.recorder import Recorder
from fasterrcnn.model.rpn import flatten_head_outputs
from fasterrcnn.ops import batched_nms, clip_boxes_to_image, remove_small_boxes

from .helpers import sample_batch, tiny_model


def rpn_reference(rpn, proposals, objectness, image_sizes, num_anchors_per_level):
    """Each image on its own: top-k per level, clip, drop small, score threshold, NMS per level, top-n.
    -> per image (proposals, scores, the boxes entering NMS with the counts)."""
    out = []
    for props, obj, size in zip(proposals, objectness, image_sizes):
        idx, lvl, offset = [], [], 0
        for i, n in enumerate(num_anchors_per_level):
            k = min(rpn.pre_nms_top_n(), n)
            idx.append(obj[offset : offset + n].topk(k).indices + offset)
            lvl.append(torch.full((k,), i))
            offset += n
        idx, lvl = torch.cat(idx), torch.cat(lvl)
        b, s = clip_boxes_to_image(props[idx], size), torch.sigmoid(obj[idx])
        keep = remove_small_boxes(b, rpn.min_size)
        b, s, lvl = b[keep], s[keep], lvl[keep]
        not_small = b.shape[0]
        keep = torch.nonzero(s >= rpn.score_thresh).flatten()
        b, s, lvl = b[keep], s[keep], lvl[keep]
        pre_nms = {"boxes": b, "scores": s, "levels": lvl, "not_small": not_small}
        keep = batched_nms(b, s, lvl, rpn.nms_thresh)
        pre_nms["after_nms"] = keep.numel()
        keep = keep[: rpn.post_nms_top_n()]
        out.append((b[keep], s[keep], pre_nms))
    return out


def postprocess_reference(heads, class_logits, box_deltas, proposals, image_sizes):
    """Each image on its own: decode every class, clip, drop background, threshold, drop tiny, NMS per class."""
    k = class_logits.shape[1]
    pred = heads.box_coder.decode(box_deltas, torch.cat(proposals)).reshape(-1, k, 4)
    scores = F.softmax(class_logits, dim=-1)
    n = [p.shape[0] for p in proposals]
    out = []
    for boxes, sc, size in zip(pred.split(n), scores.split(n), image_sizes):
        boxes = clip_boxes_to_image(boxes, size)
        labels = torch.arange(k).expand_as(sc)
        rows = torch.arange(boxes.shape[0])[:, None].expand_as(labels)
        boxes, sc, labels, rows = (
            boxes[:, 1:].reshape(-1, 4),
            sc[:, 1:].reshape(-1),
            labels[:, 1:].reshape(-1),
            rows[:, 1:].reshape(-1),
        )
        keep = torch.nonzero(sc > heads.score_thresh).flatten()
        boxes, sc, labels, rows = boxes[keep], sc[keep], labels[keep], rows[keep]
        keep = remove_small_boxes(boxes, 1e-2)
        boxes, sc, labels, rows = boxes[keep], sc[keep], labels[keep], rows[keep]
        keep = batched_nms(boxes, sc, labels, heads.nms_thresh)[: heads.detections_per_img]
        out.append({"boxes": boxes[keep], "scores": sc[keep], "labels": labels[keep], "proposal_index": rows[keep]})
    return out


def test_batched_rpn_filtering_and_post_processing_equal_the_per_image_procedure():
    torch.manual_seed(0)
    model = tiny_model(box_score_thresh=0.02, rpn_score_thresh=0.3, box_detections_per_img=15).eval()
    with torch.no_grad():  # decisive heads: many boxes above the thresholds, NMS with work to do
        model.rpn.head.cls_logits.weight.mul_(30.0)
        model.roi_heads.box_predictor.cls_score.weight.mul_(30.0)
    images, _ = sample_batch(sizes=((120, 160), (100, 130), (150, 90)))
    rpn, heads = model.rpn, model.roi_heads
    recorder = Recorder()
    with torch.inference_mode():
        image_list, _ = model.preprocess(images)
        features = model.features(image_list.tensors)
        proposals, _ = model.propose(image_list, features, recorder=recorder)
        detections, _ = model.detect(features, proposals, image_list.image_sizes, recorder=recorder)
        # the reference reads the head's raw outputs, as the RPN recorded them
        napl = recorder["rpn.num_anchors_per_level"]
        objectness, flat_deltas = flatten_head_outputs(recorder["rpn.objectness"], recorder["rpn.deltas"])
        anchors = recorder["rpn.anchors"]
        decoded = rpn.box_coder.decode(flat_deltas.reshape(-1, 4), torch.cat(anchors)).view(len(images), -1, 4)
        want = rpn_reference(rpn, decoded, objectness, image_list.image_sizes, napl)
    assert sum(b.shape[0] for b, _, _ in want) > 60
    assert any(b.shape[0] < rpn.pre_nms_top_n() * len(napl) // 2 for b, _, _ in want)  # NMS and thresholds bite
    for i, ((wb, ws, pre_nms), p) in enumerate(zip(want, proposals)):
        assert torch.equal(wb, p)
        assert torch.equal(recorder["rpn.proposals"][i], p) and torch.equal(recorder["rpn.proposal_scores"][i], ws)
        got = recorder["rpn.pre_nms"][i]
        assert torch.equal(got["boxes"], pre_nms["boxes"]) and torch.equal(got["levels"], pre_nms["levels"])
        # the sigmoid of a [B, K] batch and of one image's vector may differ in the last bit (vector lanes)
        torch.testing.assert_close(got["scores"], pre_nms["scores"], rtol=2e-7, atol=0)
        counts = recorder["rpn.counts"][i]
        assert counts["after_score_threshold"] == pre_nms["boxes"].shape[0]
        assert counts["post_nms_top_n"] == p.shape[0] and counts["anchors"] == objectness.shape[1]
        assert counts["after_small_box_removal"] == pre_nms["not_small"]
        assert counts["after_nms"] == pre_nms["after_nms"]

    class_logits, box_deltas = recorder["roi_heads.class_logits"], recorder["roi_heads.box_deltas"]
    want = postprocess_reference(heads, class_logits, box_deltas, proposals, image_list.image_sizes)
    got = [{**d, "proposal_index": r} for d, r in zip(detections, recorder["roi_heads.proposal_index"])]
    assert [len(d["scores"]) for d in want] == [len(d["scores"]) for d in got]
    assert sum(len(d["scores"]) for d in want) > 20
    for w, g in zip(want, got):
        for key in ("boxes", "scores", "labels", "proposal_index"):
            assert torch.equal(w[key], g[key]), key


def test_anchors_are_reused_and_right_for_every_size():
    model = tiny_model().eval()
    gen = model.rpn.anchor_generator
    feats = [torch.zeros(2, 8, 128 // s, 192 // s) for s in (4, 8, 16, 32, 64)]
    image = torch.zeros(2, 3, 128, 192)
    first = gen(image, feats)
    again = gen(image, feats)
    assert again[0] is first[0] and again[1] is first[0]  # one tensor, computed once
    grid = [tuple(f.shape[-2:]) for f in feats]
    fresh = torch.cat(gen.grid_anchors(grid, gen.strides_for((128, 192), grid)))
    assert torch.equal(first[0], fresh)
    other = gen(torch.zeros(1, 3, 64, 128), [torch.zeros(1, 8, 64 // s, 128 // s) for s in (4, 8, 16, 32, 64)])
    assert other[0].shape[0] < first[0].shape[0]


def test_fpn_top_down_in_place_equals_interpolate_and_add():
    torch.manual_seed(0)
    fpn = FeaturePyramidNetwork([8, 16, 32], 8).double()
    for sizes in (((16, 20), (8, 10), (4, 5)), ((17, 21), (9, 11), (5, 6))):  # exact 2x, and not
        x = OrderedDict(
            (str(i), torch.randn(2, c, h, w, dtype=torch.float64, requires_grad=True))
            for i, (c, (h, w)) in enumerate(zip((8, 16, 32), sizes))
        )
        out = fpn(x)
        feats = list(x.values())
        merged = fpn.inner_blocks[-1](feats[-1])
        want = [fpn.layer_blocks[-1](merged)]
        for i in (1, 0):
            lateral = fpn.inner_blocks[i](feats[i])
            merged = lateral + F.interpolate(merged, size=lateral.shape[-2:], mode="nearest")
            want.insert(0, fpn.layer_blocks[i](merged))
        want.append(F.max_pool2d(want[-1], kernel_size=1, stride=2))
        for o, w in zip(out.values(), want):
            torch.testing.assert_close(o, w, rtol=0, atol=1e-12)
        grads = torch.autograd.grad(sum((o**2).sum() for o in out.values()), feats)
        grads_want = torch.autograd.grad(sum((w**2).sum() for w in want), feats)
        for g, gw in zip(grads, grads_want):
            torch.testing.assert_close(g, gw, rtol=1e-12, atol=1e-12)
