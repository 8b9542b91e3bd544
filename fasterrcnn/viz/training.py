"""Training curves from a run's metrics.csv rows: losses and learning rate, AP over evaluations."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ..model.loss_names import LOSS_NAMES
from ._save import save_png


def _series(rows, kind, key):
    pts = [(int(r["iteration"]), float(r[key])) for r in rows if r["kind"] == kind and r.get(key) not in ("", None)]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_losses(rows: list[dict], path: str | Path) -> Path:
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for key in ("loss", *LOSS_NAMES):
        x, y = _series(rows, "train", key)
        if x:
            ax.plot(x, y, label=key, linewidth=2.0 if key == "loss" else 1.0)
    x, y = _series(rows, "eval", "val_loss")  # the validation loss at each evaluation (older runs have none)
    if x:
        ax.plot(x, y, label="validation loss", color="black", linestyle="--", marker="o", linewidth=2.0)
    ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    x, y = _series(rows, "train", "lr")
    ax_lr.plot(x, y, color="black")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("iteration")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return Path(path)


def plot_ap_history(rows: list[dict], path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("AP", "AP50", "AP75"):
        x, y = _series(rows, "eval", key)
        if x:
            ax.plot(x, y, marker="o", label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("COCO metric")
    ax.set_ylim(0, 1)
    if ax.lines:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return Path(path)
