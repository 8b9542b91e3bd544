"""Precision-recall curves as a PNG (matplotlib's Agg canvas; pyplot's global state is not touched).

Curves come as ``{class name: (recall, precision)}``: ``VocMetrics.curves`` (each class's curve in
detection order) or ``CocoMetrics.curves`` (COCOeval's interpolated precision at IoU 0.5 on its 101
recall thresholds).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ._save import save_png

__all__ = ["plot_precision_recall"]


def plot_precision_recall(per_class_curves: Mapping[str, tuple], path, title: str = "Precision-recall") -> Path:
    """Draw one precision-recall curve per class into ``path`` (PNG); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = [matplotlib.colormaps["tab20"](i % 20) for i in range(len(per_class_curves))]
    for color, (name, (recall, precision)) in zip(colors, per_class_curves.items()):
        recall = np.asarray(recall, dtype=np.float64).reshape(-1)
        precision = np.asarray(precision, dtype=np.float64).reshape(-1)
        if recall.shape != precision.shape:
            raise ValueError(f"curve {name!r}: {recall.size} recall and {precision.size} precision points")
        ax.plot(recall, precision, label=str(name), color=color, linewidth=1.2)
    if not per_class_curves:
        ax.text(0.5, 0.5, "no class with ground truth", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if per_class_curves:
        small = len(per_class_curves) > 12
        ax.legend(
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
            fontsize=5 if small else 8,
            ncol=2 if len(per_class_curves) > 30 else 1,
            frameon=False,
        )
    fig.tight_layout()
    return save_png(fig, path)
