"""The figures of ``fasterrcnn explain``: one PNG per stage of the detector, drawn from an explain trace
(``fasterrcnn.explain.trace.ExplainTrace``, read by attribute; this module imports nothing of engine).

Every ``plot_*`` returns ``(path, numbers)``: ``numbers`` holds exactly the values written on the figure
(titles, legends, labels), unrounded, so a test can hold them against the model's own outputs. A
figure that does not apply (anchor labels without ground truth, levels for a single feature map) is
not written: its path is None and ``numbers["note"]`` says why. Matplotlib's Agg canvas, no pyplot state.

    anchors.png          plot_anchors          anchor centres of one level, cell anchors at one location
    anchor_labels.png    plot_anchor_labels    per gt box: positive / ignored / negative anchors, best IoU
    rpn_objectness.png   plot_rpn_objectness   objectness per level (max over the anchors of a location)
    proposals.png        plot_proposals        before / after NMS, and the count after every filter
    roi_levels.png       plot_roi_levels       the pyramid level each proposal is pooled from
    roi_grid.png         plot_roi_grid         one RoI's bins and sampling points, and its pooled feature
    two_stage.png        plot_two_stage        proposal -> refined box of the top detections
    detections.png       plot_detections       the final detections, class and score
    summary.txt          write_summary         one line per stage: time and counts
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import matplotlib
import numpy as np
import torch
from matplotlib import colors as mcolors
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Rectangle

from ..ops import box_iou
from ..viz._save import save_png

__all__ = [
    "plot_anchor_labels",
    "plot_anchors",
    "plot_detections",
    "plot_proposals",
    "plot_roi_grid",
    "plot_roi_levels",
    "plot_rpn_objectness",
    "plot_two_stage",
    "write_explain_figures",
    "write_summary",
]

# bright colours, each drawn over a dark outline, so they read on dark and light images alike
POSITIVE, NEGATIVE, IGNORED, BEST, GT = "#00e676", "#ff1744", "#ffab00", "#00e5ff", "#ffffff"
OUTLINE = [patheffects.withStroke(linewidth=3.0, foreground="black")]
PALETTE = [matplotlib.colormaps["tab10"](i) for i in range(10)]
SHOWN_PROPOSALS = 50  # boxes drawn per panel of proposals.png
SHOWN_LEVEL_BOXES = 200
SHOWN_NEAR_MISSES = 8  # ignored and negative anchors drawn per gt box (those of highest IoU)


# ---- drawing helpers --------------------------------------------------------------------------------


def _figure(width: float, height: float, layout: Literal["constrained", "compressed", "tight"] | None = None) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _panel_size(trace, width: float = 5.0) -> tuple[float, float]:
    h, w = trace.image_size
    return width, max(2.5, min(3 * width, width * h / w))


def _save(fig: Figure, path: Path) -> Path:
    return save_png(fig, path, palette=True)  # the figures show photographs: a palette PNG is a quarter the size


def _as_image(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).clamp(0, 1).numpy()


def _show(ax, image: torch.Tensor, extent_size: tuple[int, int] | None = None) -> None:
    """The image with pixel edges at integer coordinates (boxes are in pixel edges); the padded area
    (``extent_size`` larger than the image) grey."""
    h, w = image.shape[-2:]
    ax.set_facecolor("0.5")  # outside the image
    if extent_size is not None:
        ax.add_patch(Rectangle((0, 0), extent_size[1], extent_size[0], color="0.5", zorder=0))
        ax.set_xlim(0, extent_size[1])
        ax.set_ylim(extent_size[0], 0)
    ax.imshow(_as_image(image), extent=(0, w, h, 0), interpolation="bilinear", zorder=1)
    if extent_size is None:
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def _box(ax, box, color, *, lw: float = 1.5, ls: str = "-", alpha: float = 1.0, zorder: int = 3) -> None:
    x1, y1, x2, y2 = (float(v) for v in box)
    outline = [patheffects.withStroke(linewidth=lw + min(1.5, lw), foreground="black", alpha=alpha)]
    ax.add_patch(
        Rectangle(
            (x1, y1),
            x2 - x1,
            y2 - y1,
            fill=False,
            edgecolor=color,
            linewidth=lw,
            linestyle=ls,
            alpha=alpha,
            path_effects=outline,
            zorder=zorder,
        )
    )


def _text_color(color) -> str:
    r, g, b = mcolors.to_rgb(color)
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def _label(ax, x: float, y: float, text: str, color, *, fontsize: float = 7, va: str = "bottom") -> None:
    """Text on a filled background of ``color`` (readable on any image); a label that would stick out
    above the top edge goes just inside it."""
    bottom, top = ax.get_ylim()  # image axes run downwards: (bottom, top)
    if va == "bottom" and y - top < 0.05 * abs(bottom - top):
        y, va = max(y, top), "top"
    ax.text(
        x,
        y,
        text,
        fontsize=fontsize,
        color=_text_color(color),
        va=va,
        ha="left",
        zorder=6,
        clip_on=True,
        bbox={"facecolor": color, "edgecolor": "black", "linewidth": 0.5, "pad": 1.0, "alpha": 0.9},
    )


def _class_name(trace, label: int) -> str:
    names = trace.class_names
    return names[label] if 0 <= label < len(names) else f"class {label}"


def _fmt_box(box) -> list[float]:
    return [float(v) for v in box]


# ---- anchors -----------------------------------------------------------------------------------------


def _cell_near(level, x: float, y: float) -> tuple[int, int]:
    sy, sx = level.stride
    gh, gw = level.size
    return min(max(round(y / sy), 0), gh - 1), min(max(round(x / sx), 0), gw - 1)


def plot_anchors(trace, path, *, level: int | None = None) -> tuple[Path, dict]:
    """Anchor centres of one level over the resized image, and every cell anchor at one location."""
    path = Path(path)
    li = len(trace.levels) // 2 if level is None else level
    lv = trace.levels[li]
    h, w = trace.image_size
    i, j = _cell_near(lv, w / 2, h / 2)
    sy, sx = lv.stride
    cx, cy = j * sx, i * sy
    a = lv.cell_anchors.shape[0]
    cells = []
    for k, (x1, y1, x2, y2) in enumerate(lv.cell_anchors.tolist()):
        ri, si = divmod(k, len(lv.anchor_sizes))  # ratio-major, then size
        cells.append(
            {
                "size": float(lv.anchor_sizes[si]),
                "ratio": float(lv.aspect_ratios[ri]),
                "width": x2 - x1,
                "height": y2 - y1,
            }
        )
    numbers = {
        "level": lv.name,
        "stride": tuple(lv.stride),
        "grid": tuple(lv.size),
        "anchors_per_location": a,
        "anchors_on_level": int(lv.anchors.shape[0]),
        "total_anchors": trace.num_anchors,
        "location": (float(cx), float(cy)),
        "cell_anchors": cells,
    }

    pw, ph = _panel_size(trace)
    fig = _figure(2 * pw + 1.5, ph + 1.2)
    ax = fig.add_subplot(1, 2, 1)
    _show(ax, trace.image, trace.padded_size)
    gy, gx = torch.meshgrid(torch.arange(lv.size[0]) * sy, torch.arange(lv.size[1]) * sx, indexing="ij")
    dot = max(0.5, min(8.0, 600.0 / max(lv.size[0] * lv.size[1], 1) ** 0.5))
    ax.scatter(
        gx.flatten().numpy(), gy.flatten().numpy(), s=dot, c="white", edgecolors="black", linewidths=0.3, zorder=4
    )
    for k in range(len(cells)):
        color = PALETTE[k % len(PALETTE)]
        x1, y1, x2, y2 = (v for v in lv.cell_anchors[k].tolist())
        _box(ax, (cx + x1, cy + y1, cx + x2, cy + y2), color, lw=1.5, zorder=5)
    ax.scatter([cx], [cy], s=40, c=BEST, marker="+", linewidths=2, zorder=6, path_effects=OUTLINE)
    ax.set_title(
        f"{lv.name}: stride {sy}x{sx} px, grid {lv.size[0]}x{lv.size[1]}, {a} anchors per location\n"
        f"{int(lv.anchors.shape[0])} anchors on {lv.name}, {trace.num_anchors} on all levels",
        fontsize=9,
    )
    handles = [
        Rectangle(
            (0, 0),
            1,
            1,
            fill=False,
            edgecolor=PALETTE[k % len(PALETTE)],
            linewidth=1.5,
            label=f"size {c['size']:g}, ratio h/w {c['ratio']:g}: {c['width']:g}x{c['height']:g}",
        )
        for k, c in enumerate(cells)
    ]
    ax.legend(
        handles=handles,
        loc="lower left",
        fontsize=7,
        framealpha=0.85,
        title=f"cell anchors at ({cx:g}, {cy:g})",
        title_fontsize=7,
    )

    # every level's cell anchors around the same point: one size per level in a pyramid
    ax2 = fig.add_subplot(1, 2, 2)
    _show(ax2, trace.image, trace.padded_size)
    handles = []
    for n, other in enumerate(trace.levels):
        oi, oj = _cell_near(other, cx, cy)
        ox, oy = oj * other.stride[1], oi * other.stride[0]
        color = PALETTE[n % len(PALETTE)]
        for x1, y1, x2, y2 in other.cell_anchors.tolist():
            _box(ax2, (ox + x1, oy + y1, ox + x2, oy + y2), color, lw=1.2)
        sizes = "/".join(f"{s:g}" for s in other.anchor_sizes)
        ratios = "/".join(f"{r:g}" for r in other.aspect_ratios)
        handles.append(
            Rectangle(
                (0, 0),
                1,
                1,
                fill=False,
                edgecolor=color,
                linewidth=1.5,
                label=f"{other.name} (stride {other.stride[0]}): size {sizes}, ratios {ratios}",
            )
        )
    ax2.legend(handles=handles, loc="lower left", fontsize=7, framealpha=0.85)
    ax2.set_title("the cell anchors of every level, each at its cell nearest that point", fontsize=9)
    fig.tight_layout()
    return _save(fig, path), numbers


# ---- anchor labels -------------------------------------------------------------------------------------


def _near_misses(indices: torch.Tensor, iou: torch.Tensor, limit: int) -> torch.Tensor:
    """The ``limit`` of ``indices`` with the highest IoU (the anchors that nearly made the class above)."""
    return indices[iou.argsort(descending=True, stable=True)[:limit]]


def plot_anchor_labels(trace, path, *, max_boxes: int = 6) -> tuple[Path | None, dict]:
    """For each gt box: its positive anchors, the ignored ones it is best for, nearby negatives, its best anchor."""
    path = Path(path)
    lab = trace.anchor_labels
    if lab is None:
        return None, {"note": "no annotations given: no anchor labels"}
    anchors = torch.cat([lv.anchors for lv in trace.levels])
    counts = dict(lab.counts)
    g_total = lab.gt_boxes.shape[0]
    per_gt = []
    for g, info in enumerate(lab.per_gt):
        per_gt.append(
            {
                "gt": _fmt_box(lab.gt_boxes[g]),
                "class": _class_name(trace, int(lab.gt_labels[g])),
                "positive": int(info.positive.numel()),
                "low_quality": info.low_quality,
                "ignored": int(info.ignored.numel()),
                "negative_overlapping": int(info.negative.numel()),
                "best_anchor": _fmt_box(anchors[info.best_anchor]),
                "best_iou": info.best_iou,
            }
        )
    shown = min(g_total, max_boxes)
    numbers = {
        **counts,
        "fg_iou_thresh": lab.fg_iou_thresh,
        "bg_iou_thresh": lab.bg_iou_thresh,
        "gt_boxes": g_total,
        "shown": shown,
        "per_gt": per_gt,
    }

    cols = max(1, min(3, shown))
    rows = max(1, -(-shown // cols))
    fig = _figure(4.2 * cols, 4.4 * rows + 1.0, layout="constrained")
    title = (
        f"RPN anchor labels: {counts['positive']} positive ({counts['low_quality']} low-quality: a gt's best "
        f"anchor below IoU {lab.fg_iou_thresh:g}),\n{counts['negative']} negative (best IoU < "
        f"{lab.bg_iou_thresh:g}), {counts['ignored']} ignored (in between); per gt box, the "
        f"{SHOWN_NEAR_MISSES} ignored and negative anchors of highest IoU are drawn"
    )
    if shown < g_total:
        title += f"\nfirst {shown} of {g_total} gt boxes shown"
    fig.suptitle(title, fontsize=9)
    if g_total == 0:
        ax = fig.add_subplot(1, 1, 1)
        _show(ax, trace.image)
        ax.set_title(f"no ground-truth boxes: all {counts['negative']} anchors are negatives", fontsize=9)
    for g in range(shown):
        info, gt = lab.per_gt[g], lab.gt_boxes[g]
        ax = fig.add_subplot(rows, cols, g + 1)
        _show(ax, trace.image)
        parts = [gt, anchors[info.best_anchor][None]]
        if info.positive.numel():
            parts.append(anchors[info.positive])
        region = torch.cat([r.reshape(-1, 4) for r in parts])
        x1, y1 = region[:, 0].min().item(), region[:, 1].min().item()
        x2, y2 = region[:, 2].max().item(), region[:, 3].max().item()
        mx, my = 0.3 * (x2 - x1) + 4, 0.3 * (y2 - y1) + 4
        ax.set_xlim(x1 - mx, x2 + mx)
        ax.set_ylim(y2 + my, y1 - my)
        for k in _near_misses(info.negative, info.negative_iou, SHOWN_NEAR_MISSES):
            _box(ax, anchors[k], NEGATIVE, lw=1.0, alpha=0.8, zorder=2)
        for k in _near_misses(info.ignored, info.ignored_iou, SHOWN_NEAR_MISSES):
            _box(ax, anchors[k], IGNORED, lw=0.8, ls="--", alpha=0.8, zorder=3)
        for k in range(info.positive.numel()):
            _box(ax, anchors[info.positive[k]], POSITIVE, lw=1.4, zorder=4)
        best = anchors[info.best_anchor]
        _box(ax, best, BEST, lw=2.0, ls=":", zorder=5)
        _label(ax, float(best[0]), float(best[3]), f"best IoU {info.best_iou:.3f}", BEST, va="top")
        _box(ax, gt, GT, lw=2.2, zorder=5)
        n = per_gt[g]
        _label(ax, float(gt[0]), float(gt[1]), f"gt {g}: {n['class']}", GT)
        ax.set_title(
            f"gt {g} {n['class']}: {n['positive']} positive ({n['low_quality']} low-quality),\n"
            f"{n['ignored']} ignored, {n['negative_overlapping']} negatives overlap it",
            fontsize=8,
        )
    handles = [
        Rectangle((0, 0), 1, 1, fill=False, edgecolor=c, linewidth=1.5, linestyle=ls, label=t)
        for c, ls, t in (
            (POSITIVE, "-", f"positive (IoU >= {lab.fg_iou_thresh:g} or the gt's best)"),
            (IGNORED, "--", "ignored"),
            (NEGATIVE, "-", f"negative (IoU < {lab.bg_iou_thresh:g})"),
            (BEST, ":", "best anchor"),
            (GT, "-", "ground truth"),
        )
    ]
    legend = fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=3 if cols < 3 else 5,
        fontsize=7,
        facecolor="0.3",
        labelcolor="white",
        framealpha=1.0,
    )
    legend.get_frame().set_edgecolor("black")
    return _save(fig, path), numbers


# ---- RPN objectness --------------------------------------------------------------------------------------


def plot_rpn_objectness(trace, path) -> tuple[Path, dict]:
    """Per level: the highest objectness among the anchors of each location, over the image."""
    path = Path(path)
    levels = []
    n = len(trace.levels)
    pw, ph = _panel_size(trace, 3.6)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = _figure(cols * pw + 0.8, rows * (ph + 0.6) + 0.6)
    image = None
    for k, lv in enumerate(trace.levels):
        heat = lv.objectness.max(dim=0).values
        levels.append(
            {
                "name": lv.name,
                "stride": tuple(lv.stride),
                "size": tuple(lv.size),
                "anchors_per_location": int(lv.objectness.shape[0]),
                "max": float(heat.max()),
            }
        )
        ax = fig.add_subplot(rows, cols, k + 1)
        _show(ax, trace.image, trace.padded_size)
        # one square per location, centred on its anchors' centre (x = j * stride, as the anchor grid lays them)
        sy, sx = lv.stride
        extent = (-sx / 2, lv.size[1] * sx - sx / 2, lv.size[0] * sy - sy / 2, -sy / 2)
        image = ax.imshow(
            heat.numpy(),
            extent=extent,
            cmap="inferno",
            vmin=0.0,
            vmax=1.0,
            alpha=0.65,
            interpolation="nearest",
            zorder=2,
        )
        ax.set_title(
            f"{lv.name}: stride {lv.stride[0]}, {lv.size[0]}x{lv.size[1]}, max {levels[-1]['max']:.3f}", fontsize=8
        )
    fig.suptitle("RPN objectness (sigmoid), the highest of the anchors at each location", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.92, 0.95))
    if image is not None:
        cax = fig.add_axes((0.93, 0.1, 0.015, 0.75))
        fig.colorbar(image, cax=cax)
    return _save(fig, path), {"levels": levels}


# ---- proposals -----------------------------------------------------------------------------------------


FILTER_STEPS = (
    "anchors",
    "pre_nms_top_k",
    "after_small_box_removal",
    "after_score_threshold",
    "after_nms",
    "post_nms_top_n",
)


def _filter_labels(trace) -> dict[str, str]:
    s = trace.rpn_settings
    return {
        "anchors": "anchors",
        "pre_nms_top_k": f"top {s['pre_nms_top_n']:g}\nper level",
        "after_small_box_removal": f"clip, drop\n< {s['min_size']:g} px",
        "after_score_threshold": f"score\n>= {s['score_thresh']:g}",
        "after_nms": f"NMS {s['nms_thresh']:g}\n(per level)",
        "post_nms_top_n": f"top {s['post_nms_top_n']:g}",
    }


def _draw_scored_boxes(ax, boxes: torch.Tensor, scores: torch.Tensor, limit: int, norm) -> int:
    order = scores.argsort(descending=True)[:limit]
    cmap = matplotlib.colormaps["viridis"]
    for k in order.flip(0):  # best on top
        _box(ax, boxes[k], cmap(norm(float(scores[k]))), lw=1.0, alpha=0.9)
    return int(order.numel())


def plot_proposals(trace, path, *, shown: int = SHOWN_PROPOSALS) -> tuple[Path, dict]:
    """The top proposals entering NMS and those kept after it, and the count after each filter."""
    path = Path(path)
    counts = {k: int(trace.filter_counts[k]) for k in FILTER_STEPS if k in trace.filter_counts}
    pw, ph = _panel_size(trace, 4.2)
    fig = _figure(2 * pw + 4.5, ph + 1.0)
    grid = fig.add_gridspec(1, 3, width_ratios=(pw, pw, 4.0))
    # one colour scale for both panels, over the scores drawn
    drawn = torch.cat(
        [
            trace.nms_candidate_scores.sort(descending=True).values[:shown],
            trace.proposal_scores.sort(descending=True).values[:shown],
        ]
    )
    lo, hi = (float(drawn.min()), float(drawn.max())) if drawn.numel() else (0.0, 1.0)
    norm = mcolors.Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-6)
    ax = fig.add_subplot(grid[0, 0])
    _show(ax, trace.image)
    n_before = _draw_scored_boxes(ax, trace.nms_candidates, trace.nms_candidate_scores, shown, norm)
    ax.set_title(f"before NMS: top {n_before} of {trace.nms_candidates.shape[0]}", fontsize=9)
    ax = fig.add_subplot(grid[0, 1])
    _show(ax, trace.image)
    n_after = _draw_scored_boxes(ax, trace.proposals, trace.proposal_scores, shown, norm)
    ax.set_title(
        f"after NMS {trace.rpn_settings['nms_thresh']:g}: top {n_after} of {trace.proposals.shape[0]}", fontsize=9
    )
    ax = fig.add_subplot(grid[0, 2])
    labels = _filter_labels(trace)
    xs = np.arange(len(counts))
    bars = ax.bar(xs, list(counts.values()), color=[PALETTE[k % 10] for k in range(len(counts))])
    ax.set_yscale("log")
    ax.set_xticks(xs, [labels[k] for k in counts], fontsize=7)
    for bar, value in zip(bars, counts.values()):
        ax.text(bar.get_x() + bar.get_width() / 2, max(value, 1), str(value), ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("boxes alive")
    ax.set_title("RPN proposals: boxes left after each filter", fontsize=9)
    fig.suptitle(f"colour: objectness from {lo:.3f} (dark) to {hi:.3f} (yellow)", fontsize=8)
    fig.tight_layout()
    numbers = {
        "counts": counts,
        "shown_before_nms": n_before,
        "shown_after_nms": n_after,
        "nms_candidates": int(trace.nms_candidates.shape[0]),
        "proposals": int(trace.proposals.shape[0]),
        "score_range": (lo, hi),
        **{
            k: trace.rpn_settings[k]
            for k in ("pre_nms_top_n", "post_nms_top_n", "nms_thresh", "min_size", "score_thresh")
        },
    }
    return _save(fig, path), numbers


# ---- RoI levels and the RoI grid ------------------------------------------------------------------------


def plot_roi_levels(trace, path, *, shown: int = SHOWN_LEVEL_BOXES) -> tuple[Path | None, dict]:
    """Proposals coloured by the feature map they are pooled from, and their sizes against the level bounds."""
    path = Path(path)
    if trace.roi_levels is None:
        note = next(
            (n for n in trace.notes if "feature map" in n or "pooler" in n), "no level assignment for this pooler"
        )
        return None, {"note": note}
    names = trace.roi_level_names
    counts = {name: int((trace.roi_levels == k).sum()) for k, name in enumerate(names)}
    sides = (trace.proposals[:, 2:] - trace.proposals[:, :2]).clamp(min=0).prod(dim=1).sqrt()
    pw, ph = _panel_size(trace, 4.5)
    fig = _figure(pw + 5.0, ph + 1.0)
    grid = fig.add_gridspec(1, 2, width_ratios=(pw, 4.5))
    ax = fig.add_subplot(grid[0, 0])
    _show(ax, trace.image)
    order = trace.proposal_scores.argsort(descending=True)[:shown]
    for k in order.flip(0):
        _box(ax, trace.proposals[k], PALETTE[int(trace.roi_levels[k]) % 10], lw=1.0)
    handles = [
        Rectangle((0, 0), 1, 1, color=PALETTE[k % 10], label=f"{name}: {counts[name]}") for k, name in enumerate(names)
    ]
    ax.legend(handles=handles, loc="lower left", fontsize=7, framealpha=0.85, title="RoIs per level", title_fontsize=7)
    ax.set_title(
        f"top {order.numel()} of {trace.proposals.shape[0]} proposals by the level they are pooled from", fontsize=9
    )
    ax = fig.add_subplot(grid[0, 1])
    top = max(float(sides.max()) if sides.numel() else 1.0, max(trace.roi_level_bounds, default=1.0)) * 1.1
    bins = np.linspace(0, top, 40)
    data = [sides[trace.roi_levels == k].numpy() for k in range(len(names))]
    # matplotlib's stubs leave out the array that bins also takes
    ax.hist(data, bins=bins, stacked=True, color=[PALETTE[k % 10] for k in range(len(names))], label=names)  # type: ignore[arg-type]
    for b in trace.roi_level_bounds:
        ax.axvline(b, color="black", linestyle="--", linewidth=1)
        ax.text(b, ax.get_ylim()[1] * 0.95, f" {b:g}", fontsize=7, va="top")
    ax.set_xlabel("sqrt(area) of the proposal, pixels")
    ax.set_ylabel("proposals")
    ax.set_title("level bounds (dashed)", fontsize=9)
    fig.suptitle(trace.pooler, fontsize=8)
    fig.tight_layout()
    numbers = {"counts": counts, "shown": int(order.numel()), "bounds": list(trace.roi_level_bounds)}
    return _save(fig, path), numbers


def plot_roi_grid(trace, path) -> tuple[Path | None, dict]:
    """One RoI: its bins and sampling points over the image and over its feature map, and the pooled feature."""
    path = Path(path)
    roi = trace.roi
    if roi is None:
        return None, {"note": "no RoI to show (no proposals, or a pooler explain does not know)"}
    oh, ow = roi.output_size
    x1, y1, x2, y2 = (float(v) for v in roi.box)
    bin_h = float((roi.bins_y[:, 1] - roi.bins_y[:, 0]).mean())
    bin_w = float((roi.bins_x[:, 1] - roi.bins_x[:, 0]).mean())
    stride = 1.0 / roi.spatial_scale
    numbers = {
        "proposal_index": roi.proposal_index,
        "box": [x1, y1, x2, y2],
        "level": roi.level,
        "spatial_scale": roi.spatial_scale,
        "op": roi.op,
        "output_size": (oh, ow),
        "bin_size": (bin_h, bin_w),
        "grid": roi.grid,
        "sampling_ratio": roi.sampling_ratio,
    }
    fig = _figure(14.0, 5.2)

    def draw_grid(ax, to):  # to: image pixels -> the panel's coordinates
        for a, b in roi.bins_x.tolist():
            for c, d in roi.bins_y.tolist():
                ax.add_patch(
                    Rectangle(
                        (to(a), to(c)),
                        to(b) - to(a),
                        to(d) - to(c),
                        fill=False,
                        edgecolor="white",
                        linewidth=0.8,
                        path_effects=[patheffects.withStroke(linewidth=1.8, foreground="black")],
                    )
                )
        if roi.samples_x is not None:
            sy, sx = torch.meshgrid(roi.samples_y.flatten(), roi.samples_x.flatten(), indexing="ij")
            ax.scatter(
                to(sx.flatten()).numpy(),
                to(sy.flatten()).numpy(),
                s=10,
                c=BEST,
                edgecolors="black",
                linewidths=0.5,
                zorder=5,
            )

    # over the image
    ax = fig.add_subplot(1, 3, 1)
    _show(ax, trace.image)
    draw_grid(ax, lambda v: v)
    margin = 0.25 * max(x2 - x1, y2 - y1) + 2 * stride  # the same on both axes: thin RoIs stay visible
    ax.set_xlim(x1 - margin, x2 + margin)
    ax.set_ylim(y2 + margin, y1 - margin)
    how = (
        f"{roi.grid[0]}x{roi.grid[1]} bilinear samples per bin (sampling_ratio {roi.sampling_ratio})"
        if roi.grid is not None
        else "RoIPool: max over each quantised bin"
    )
    ax.set_title(
        f"RoI #{roi.proposal_index} [{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}]\n"
        f"{oh}x{ow} bins of {bin_h:.2f} x {bin_w:.2f} px; {how}",
        fontsize=8,
    )

    # over the feature map, in its own cells
    ax = fig.add_subplot(1, 3, 2)
    ax.set_facecolor("0.5")
    ax.imshow(roi.feature.numpy(), cmap="viridis", interpolation="nearest")
    draw_grid(ax, lambda v: v * roi.spatial_scale - roi.offset)
    s = roi.spatial_scale
    ax.set_xlim((x1 - margin) * s, (x2 + margin) * s)
    ax.set_ylim((y2 + margin) * s, (y1 - margin) * s)
    ax.set_title(
        f"on {roi.level} (spatial scale 1/{stride:g}): mean over channels,\none square per feature cell", fontsize=8
    )

    # the pooled feature
    ax = fig.add_subplot(1, 3, 3)
    im = ax.imshow(roi.pooled.numpy(), cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(ow))
    ax.set_yticks(range(oh))
    ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(f"pooled {oh}x{ow} feature (mean over channels)\nthe input of the box head", fontsize=8)
    fig.tight_layout()
    return _save(fig, path), numbers


# ---- the second stage and the detections ------------------------------------------------------------------


def _shown_detections(trace, score_threshold: float, limit: int | None = None) -> torch.Tensor:
    scores = trace.detections["scores"]
    keep = torch.nonzero(scores >= score_threshold).flatten()
    keep = keep[scores[keep].argsort(descending=True)]
    return keep if limit is None else keep[:limit]


def plot_two_stage(trace, path, *, score_threshold: float = 0.5, limit: int = 10) -> tuple[Path, dict]:
    """The top detections: the proposal each came from (dashed) and the box the head refined it to."""
    path = Path(path)
    keep = _shown_detections(trace, score_threshold, limit)
    pairs = []
    pw, ph = _panel_size(trace, 6.0)
    fig = _figure(pw + 5.5, ph + 1.2)
    grid = fig.add_gridspec(1, 2, width_ratios=(pw, 5.0))
    ax = fig.add_subplot(grid[0, 0])
    _show(ax, trace.image)
    for n, d in enumerate(keep.tolist()):
        r = int(trace.detection_proposal_index[d])
        proposal, refined = trace.proposals[r], trace.detection_boxes_resized[d]
        label = int(trace.detections["labels"][d])
        pair = {
            "proposal_index": r,
            "proposal": _fmt_box(proposal),
            "objectness": float(trace.proposal_scores[r]),
            "refined": _fmt_box(refined),
            "label": label,
            "class": _class_name(trace, label),
            "score": float(trace.detections["scores"][d]),
            "iou": float(box_iou(proposal[None], refined[None])[0, 0]),
        }
        pairs.append(pair)
        color = PALETTE[n % 10]
        _box(ax, proposal, color, lw=1.2, ls="--")
        _box(ax, refined, color, lw=2.0)
        start = ((proposal[0] + proposal[2]) / 2, (proposal[1] + proposal[3]) / 2)
        end = ((refined[0] + refined[2]) / 2, (refined[1] + refined[3]) / 2)
        ax.add_patch(
            FancyArrowPatch(
                (float(start[0]), float(start[1])),
                (float(end[0]), float(end[1])),
                arrowstyle="-|>",
                mutation_scale=10,
                color=color,
                linewidth=1.2,
                path_effects=OUTLINE,
                zorder=5,
            )
        )
        _label(ax, float(refined[0]), float(refined[1]), str(n + 1), color)
    if not pairs:
        ax.text(
            0.5,
            0.5,
            f"no detection with score >= {score_threshold:g}",
            transform=ax.transAxes,
            ha="center",
            fontsize=10,
            bbox={"facecolor": "white", "alpha": 0.8},
        )
    ax.set_title(
        "first chance: the RPN's proposal (dashed)\nsecond: the box head's box for its class (solid)", fontsize=9
    )
    table = fig.add_subplot(grid[0, 1])
    table.axis("off")
    if pairs:
        rows = [
            [str(n + 1), p["class"], f"{p['objectness']:.3f}", f"{p['score']:.3f}", f"{p['iou']:.3f}"]
            for n, p in enumerate(pairs)
        ]
        t = table.table(
            cellText=rows,
            colLabels=["#", "class", "RPN objectness", "class score", "IoU proposal/box"],
            loc="upper center",
            cellLoc="center",
        )
        t.auto_set_font_size(False)
        t.set_fontsize(8)
        t.scale(1.0, 1.3)
        for n in range(len(rows)):
            t[n + 1, 0].set_facecolor(PALETTE[n % 10])
            t[n + 1, 0].get_text().set_color(_text_color(PALETTE[n % 10]))
    table.set_title(f"top {len(pairs)} detections with score >= {score_threshold:g}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path), {"threshold": score_threshold, "shown": len(pairs), "pairs": pairs}


def plot_cascade_stages(trace, path, *, score_threshold: float = 0.5, limit: int = 6) -> tuple[Path | None, dict]:
    """Cascade R-CNN: for the top detections, the RPN's proposal (dashed) and the box after each stage (thin to
    thick); None for a model with one second stage."""
    if trace.cascade_boxes is None:
        return None, {}
    path = Path(path)
    keep = _shown_detections(trace, score_threshold, limit)
    stages = trace.cascade_boxes  # [proposals, stage 1's boxes, ..., the last stage's]
    pw, ph = _panel_size(trace, 6.0)
    fig = _figure(pw, ph + 1.0)
    ax = fig.add_subplot(1, 1, 1)
    _show(ax, trace.image)
    shown = []
    for n, d in enumerate(keep.tolist()):
        r = int(trace.detection_proposal_index[d])
        color = PALETTE[n % 10]
        path_boxes = [_fmt_box(s[r]) for s in stages]
        for k, box in enumerate(path_boxes):
            _box(ax, box, color, lw=0.8 + 0.7 * k, ls="--" if k == 0 else "-", alpha=0.45 + 0.55 * k / len(stages))
        _label(ax, path_boxes[-1][0], path_boxes[-1][1], str(n + 1), color)
        ious = [float(box_iou(stages[k][r][None], stages[k + 1][r][None])[0, 0]) for k in range(len(stages) - 1)]
        shown.append({"proposal_index": r, "boxes": path_boxes, "iou_between_stages": ious})
    ax.set_title(
        f"Cascade R-CNN: each detection's proposal (dashed) and its box after each of the {len(stages) - 1} "
        "stages (thicker: later)",
        fontsize=8,
    )
    fig.tight_layout()
    return _save(fig, path), {"threshold": score_threshold, "stages": len(stages) - 1, "shown": shown}


def plot_detections(trace, path, *, score_threshold: float = 0.5) -> tuple[Path, dict]:
    """The final detections on the original image, class and score."""
    path = Path(path)
    keep = _shown_detections(trace, score_threshold)
    total = int(trace.detections["scores"].numel())
    dets: list[dict[str, Any]] = []
    h, w = trace.original_size
    width = 7.0
    fig = _figure(width, max(2.5, min(3 * width, width * h / w)) + 0.8)
    ax = fig.add_subplot(1, 1, 1)
    _show(ax, trace.original_image)
    for d in keep.flip(0).tolist():  # best drawn last, on top
        label = int(trace.detections["labels"][d])
        det: dict[str, Any] = {
            "box": _fmt_box(trace.detections["boxes"][d]),
            "label": label,
            "class": _class_name(trace, label),
            "score": float(trace.detections["scores"][d]),
        }
        dets.insert(0, det)
        color = PALETTE[label % 10]
        _box(ax, det["box"], color, lw=2.0)
        _label(ax, det["box"][0], det["box"][1], f"{det['class']} {det['score']:.2f}", color)
    s = trace.box_settings
    ax.set_title(
        f"{len(dets)} detections with score >= {score_threshold:g} (of {total} after score > "
        f"{s['score_thresh']:g} and per-class NMS {s['nms_thresh']:g}, at most {s['detections_per_img']:g})",
        fontsize=8,
    )
    fig.tight_layout()
    return _save(fig, path), {"threshold": score_threshold, "shown": len(dets), "total": total, "detections": dets}


# ---- everything ----------------------------------------------------------------------------------------------


FIGURES = (
    "anchors",
    "anchor_labels",
    "rpn_objectness",
    "proposals",
    "roi_levels",
    "roi_grid",
    "two_stage",
    "detections",
)  # the file names (.png) write_explain_figures makes, in the pipeline's order


def write_explain_figures(
    trace, out_dir, *, level: int | None = None, score_threshold: float = 0.5
) -> dict[str, tuple[Path | None, dict]]:
    """Every figure into ``out_dir``: {name: (path or None when it does not apply, numbers)}."""
    out = Path(out_dir)
    figures = {
        "anchors": plot_anchors(trace, out / "anchors.png", level=level),
        "anchor_labels": plot_anchor_labels(trace, out / "anchor_labels.png"),
        "rpn_objectness": plot_rpn_objectness(trace, out / "rpn_objectness.png"),
        "proposals": plot_proposals(trace, out / "proposals.png"),
        "roi_levels": plot_roi_levels(trace, out / "roi_levels.png"),
        "roi_grid": plot_roi_grid(trace, out / "roi_grid.png"),
        "two_stage": plot_two_stage(trace, out / "two_stage.png", score_threshold=score_threshold),
        "detections": plot_detections(trace, out / "detections.png", score_threshold=score_threshold),
    }
    if trace.cascade_boxes is not None:  # Cascade R-CNN: the boxes after each stage
        figures["cascade_stages"] = plot_cascade_stages(
            trace, out / "cascade_stages.png", score_threshold=score_threshold
        )
    return figures


def summary_lines(trace, *, score_threshold: float = 0.5) -> dict[str, list[str]]:
    """What each of the model's stages did, in words and counts: {stage: [text, ...]}, in the trace's stage order."""
    lv = trace.levels
    c = trace.filter_counts
    scores = trace.detections["scores"]
    propose = [
        f"{lv[0].objectness.shape[0]} anchors per location; max objectness "
        + ", ".join(f"{x.name} {float(x.objectness.max()):.3f}" for x in lv),
        f"{trace.num_anchors} anchors: " + ", ".join(f"{x.name} {x.anchors.shape[0]}" for x in lv),
        " -> ".join(f"{k} {c[k]}" for k in FILTER_STEPS if k in c),
    ]
    if trace.anchor_labels is not None:
        n = trace.anchor_labels.counts
        propose.append(
            f"{trace.anchor_labels.gt_boxes.shape[0]} gt boxes: {n['positive']} positive "
            f"({n['low_quality']} low-quality), {n['negative']} negative, {n['ignored']} ignored"
        )
    text = {
        "preprocess": [
            f"{trace.original_size[0]}x{trace.original_size[1]} -> {trace.image_size[0]}x"
            f"{trace.image_size[1]} (scale {trace.scale[0]:.3f}), padded to {trace.padded_size[0]}x"
            f"{trace.padded_size[1]}"
        ],
        "features": [
            f"{len(lv)} maps: " + ", ".join(f"{x.name} {x.size[0]}x{x.size[1]} (stride {x.stride[0]})" for x in lv)
        ],
        "propose": propose,
        "detect": [
            f"{trace.proposals.shape[0]} RoIs; "
            + (
                ", ".join(f"{n} {int((trace.roi_levels == k).sum())}" for k, n in enumerate(trace.roi_level_names))
                if trace.roi_levels is not None
                else trace.pooler
            ),
            f"{trace.proposals.shape[0]} RoIs x {len(trace.class_names)} classes (with background) -> "
            f"{scores.numel()} detections",
        ],
        "postprocess": [
            f"{scores.numel()} detections, {int((scores >= score_threshold).sum())} with score >= "
            f"{score_threshold:g}, in the original image's pixels"
        ],
    }
    return {stage: text.get(stage, [""]) for stage in trace.times}


def write_summary(trace, out_dir, *, score_threshold: float = 0.5) -> tuple[Path, str]:
    """summary.txt: per stage its time (ms) and counts (continuation lines indented). -> (path, text)."""
    lines = []
    for stage, parts in summary_lines(trace, score_threshold=score_threshold).items():
        lines.append(f"{stage:<14}{trace.times[stage] * 1000:9.1f} ms  {parts[0]}")
        lines += [f"{'':<14}{'':>12}  {part}" for part in parts[1:]]  # indented: the same stage
    text = "\n".join(lines) + "\n"
    path = Path(out_dir) / "summary.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path, text
