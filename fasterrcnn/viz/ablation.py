"""The ablation grid in one picture: AP, AP50 and AP_small per cell, and each cell's time."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from ._save import save_png

BARS = (("AP", "AP"), ("AP50", "AP50"), ("APs", "AP_small"))


def plot_ablation(rows: list[dict], path: str | Path) -> Path:
    """``rows``: one dict per cell with ``cell``, ``AP``, ``AP50``, ``APs``, ``train_s``, ``eval_s``."""
    names = [r["cell"] for r in rows]
    x = np.arange(len(rows))
    width = 0.8 / len(BARS)
    fig, (ax, ax_t) = plt.subplots(
        2, 1, figsize=(max(6.0, 0.75 * len(rows) + 2), 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    for i, (key, label) in enumerate(BARS):
        ax.bar(x + (i - (len(BARS) - 1) / 2) * width, [r[key] for r in rows], width, label=label)
    if rows:
        ax.axhline(rows[0]["AP"], color="black", linewidth=0.8, linestyle="--", label=f"{names[0]} AP")
    ax.set_ylabel("COCO metric")
    top = max([r[key] for r in rows for key, _ in BARS] + [0.0])
    ax.set_ylim(0, min(1.0, max(0.1, 1.3 * top)))  # room above the bars for the legend
    ax.legend(fontsize=8, ncol=4, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    ax_t.bar(x, [r["train_s"] for r in rows], 0.6, label="training")
    ax_t.bar(x, [r["eval_s"] for r in rows], 0.6, bottom=[r["train_s"] for r in rows], label="evaluation")
    ax_t.set_ylabel("wall time (s)")
    ax_t.legend(fontsize=8)
    ax_t.grid(axis="y", alpha=0.3)
    ax_t.set_xticks(x)
    ax_t.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return Path(path)
