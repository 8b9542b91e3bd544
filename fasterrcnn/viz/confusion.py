"""Error-analysis figures as PNGs: the confusion matrix as an annotated heatmap, and F1 against score threshold.

Inputs come from ``fasterrcnn.evaluation.confusion``: a ``ConfusionMatrix`` (background last) and an ``F1Curve``.
Both figures stay readable from 2 to about 20 classes: cell text and legend shrink as classes grow.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.lines import Line2D

from ..evaluation.confusion import ConfusionMatrix, F1Curve
from ._save import save_png

__all__ = ["plot_confusion_matrix", "plot_f1_curve"]

MAX_LEGEND = 20  # classes named in the F1 legend
CAPTION_SIZE = 8.0  # points


def _caption_lines(text: str, *, width_in: float) -> list[str]:
    """``text`` wrapped to a figure ``width_in`` inches wide at the caption's font size (about 16 characters an inch
    at 8 points)."""
    return textwrap.wrap(text, width=max(40, int((width_in - 0.3) * 16)))


def plot_confusion_matrix(cm: ConfusionMatrix, path, *, normalized: bool = True, title: str | None = None) -> Path:
    """Heatmap of ``cm`` (rows: ground truth, columns: predicted, background last) into ``path`` (PNG).

    ``normalized``: colour and main text are each row's shares (2 decimals) with the count in small text under
    them; otherwise the counts. Zero cells stay blank. The caption under the plot states the matching rule.
    """
    counts = np.asarray(cm.counts)
    n = counts.shape[0]
    shares = cm.normalized()
    values = shares if normalized else counts.astype(np.float64)
    side = float(np.clip(1.5 + 0.6 * n, 4.0, 13.0))  # the grid, inches
    cell_pt = side / n * 72
    value_size = float(np.clip(cell_pt * 0.22, 6.5, 12.0))
    count_size = max(5.0, value_size * 0.72)
    label_size = float(np.clip(cell_pt * 0.3, 7.0, 10.0))
    longest = max(len(name) for name in cm.class_names)
    labels_in = longest * label_size * 0.6 / 72  # the widest tick label
    width = side + labels_in + 2.2  # y labels, colour bar
    caption = f"{cm.rule} Background column: missed objects; background row: false detections. " + (
        "Cells: share of the row (count)." if normalized else "Cells: counts."
    )
    lines = _caption_lines(caption, width_in=width)
    caption_in = 0.15 + len(lines) * CAPTION_SIZE * 1.25 / 72
    height = side + labels_in * (0.75 if n > 4 else 0.25) + 1.2 + caption_in

    # constrained layout keeps the colour bar and the rotated labels inside; the caption gets the strip below
    engine = ConstrainedLayoutEngine(rect=(0.0, caption_in / height, 1.0, 1.0 - caption_in / height))
    fig, ax = plt.subplots(figsize=(width, height), dpi=100, layout=engine)
    vmax = 1.0 if normalized else max(1.0, float(values.max(initial=0.0)))
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the row" if normalized else "count")
    for i in range(n):
        for j in range(n):
            if counts[i, j] == 0:
                continue
            colour = "white" if values[i, j] > 0.55 * vmax else "black"
            if normalized:
                ax.text(j, i - 0.13, f"{shares[i, j]:.2f}", ha="center", va="center", color=colour, fontsize=value_size)
                ax.text(j, i + 0.25, f"({counts[i, j]})", ha="center", va="center", color=colour, fontsize=count_size)
            else:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=colour, fontsize=value_size)

    ticks = np.arange(n)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels(cm.class_names, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticklabels(cm.class_names)
    ax.tick_params(labelsize=label_size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    # background apart from the classes: its column is the missed objects, its row the false detections
    ax.axhline(n - 1.5, color="grey", linewidth=1.0)
    ax.axvline(n - 1.5, color="grey", linewidth=1.0)
    ax.set_title(title or f"Confusion matrix (IoU >= {cm.iou_threshold:g}, score >= {cm.score_threshold:g})")
    fig.text(0.02, 0.1 / height, "\n".join(lines), ha="left", va="bottom", fontsize=CAPTION_SIZE, color="dimgrey")
    save_png(fig, path)
    plt.close(fig)
    return Path(path)


def _curve_names(curve: F1Curve, class_names: list[str]) -> list[str]:
    """Names of classes 1..C: ``class_names`` is the model's list (background first) or the C names alone."""
    num_real = curve.per_class_f1.shape[0]
    if len(class_names) == num_real + 1:
        return [str(n) for n in class_names[1:]]
    if len(class_names) == num_real:
        return [str(n) for n in class_names]
    raise ValueError(
        f"class_names has {len(class_names)} names; the curve has {num_real} classes "
        f"(expected {num_real + 1} with '__background__' first, or {num_real})"
    )


def plot_f1_curve(curve: F1Curve, class_names: list[str], path, *, title: str | None = None) -> Path:
    """F1 against score threshold into ``path`` (PNG): a thin line per class with ground truth, the all-class curve
    thick, and the best threshold marked. ``class_names``: the model's list (``"__background__"`` first) or the
    C class names. The legend names at most 20 classes."""
    names = _curve_names(curve, class_names)
    fig, ax = plt.subplots(figsize=(9.0, 5.5), dpi=100)
    tab20 = matplotlib.colormaps["tab20"]
    shown = [k for k in range(len(names)) if not np.all(np.isnan(curve.per_class_f1[k]))]
    for i, k in enumerate(shown):
        colour = tab20((2 * i) % 20 + (i // 10) % 2)  # tab20's ten dark colours first, then the light ones
        label = names[k] if i < MAX_LEGEND else None
        ax.plot(curve.thresholds, curve.per_class_f1[k], color=colour, linewidth=0.9, alpha=0.85, label=label)
    ax.plot(curve.thresholds, curve.f1, color="black", linewidth=2.6, label="all classes")
    best = f"{curve.best_threshold:g}"
    ax.axvline(curve.best_threshold, color="crimson", linestyle="--", linewidth=1.3)
    ax.plot([curve.best_threshold], [curve.best_f1], marker="o", color="crimson")
    if curve.best_f1 > 0:
        verdict = f"best F1 {curve.best_f1:.2f} at score {best} (pass --score-threshold {best})"
    else:
        verdict = "F1 is 0 at every threshold: no detection matched an object"
    ax.text(0.5, -0.16, verdict, transform=ax.transAxes, ha="center", va="top", fontsize=10, color="crimson")
    ax.set_xlim(float(curve.thresholds[0]), float(curve.thresholds[-1]))
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("score threshold")
    ax.set_ylabel("F1")
    ax.set_title(title or "F1 against score threshold")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    handles, labels = handles[-1:] + handles[:-1], labels[-1:] + labels[:-1]  # "all classes" first
    if len(shown) > MAX_LEGEND:
        handles.append(Line2D([], [], linestyle="none"))
        labels.append(f"(+{len(shown) - MAX_LEGEND} more classes)")
    ax.legend(
        handles,
        labels,
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        fontsize=6.5 if len(labels) > 12 else 8,
        frameon=False,
    )
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return Path(path)
