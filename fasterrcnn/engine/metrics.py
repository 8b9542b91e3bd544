"""A run's numbers: metrics.csv (a row per log window and per evaluation) and the logging window,
the losses summed over the steps since the last logged row."""

import csv
import io
import logging
import time
from pathlib import Path

import torch

from ..files import atomic_open, disk_full_error, is_disk_full
from ..model.loss_names import LOSS_NAMES
from . import distributed as dist

log = logging.getLogger("fasterrcnn")
EVAL_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "VOC07_mAP50", "VOC_mAP50")
# the validation loss of an eval row: its total (weighted as training's) and the four losses
VAL_LOSS_COLUMNS = ("val_loss", *(f"val_{k}" for k in LOSS_NAMES))
CSV_COLUMNS = (
    "kind",
    "iteration",
    "epoch",
    "lr",
    "loss",
    *LOSS_NAMES,
    "images_per_s",
    *EVAL_COLUMNS,
    *VAL_LOSS_COLUMNS,
)


class MetricsLog:
    """metrics.csv: a row per log window and per evaluation, appended as the run goes.

    Appending keeps every earlier row whole; a kill in the middle of a row leaves a cut last line,
    which ``read_metrics`` skips. On resume, the rows written after the checkpoint's iteration (work
    that is about to be redone) are dropped and the file is rewritten atomically, so the resumed log
    has no duplicates.
    """

    def __init__(self, path: Path, resume_iteration: int | None = None):
        self.path = path
        kept = []
        if resume_iteration is not None and path.exists():
            rows = read_metrics(path)
            kept = [r for r in rows if int(r["iteration"]) <= resume_iteration]
            if len(kept) < len(rows):
                log.info(
                    "metrics.csv: dropped %d row(s) written after iteration %d (they are redone)",
                    len(rows) - len(kept),
                    resume_iteration,
                )
        with atomic_open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(kept)

    def write(self, row: dict) -> None:
        try:
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerow([_fmt(row.get(c, "")) for c in CSV_COLUMNS])
                f.flush()
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(self.path, e) from e
            raise

    def rows(self) -> list[dict]:
        return read_metrics(self.path)


def read_metrics(path: str | Path) -> list[dict]:
    """The complete rows of a metrics.csv (a last line cut short by a kill is left out)."""
    with open(path, newline="") as f:
        text = f.read()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        if None in row.values() or None in row:  # too few or too many fields
            continue
        try:
            int(row["iteration"])
        except (TypeError, ValueError):
            continue
        rows.append(row)
    return rows


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


class LossWindow:
    """The losses of the steps since the last logged row (summed per loss, each step's the mean over
    its accumulated batches) and the images seen. A checkpoint keeps the sums and the step count, so
    that a resumed run logs the same means."""

    def __init__(self, sums: dict[str, float] | None = None, steps: int = 0):
        self.sums = dict(sums) if sums is not None else dict.fromkeys(LOSS_NAMES, 0.0)
        self.steps, self.images, self.start = steps, 0, time.perf_counter()

    @classmethod
    def from_checkpoint(cls, state: dict) -> "LossWindow":
        if "log_window" not in state:
            return cls()
        window = state["log_window"]
        return cls({k: float(v) for k, v in window["sums"].items()}, window["window"])

    def to_checkpoint(self) -> dict:
        """Every rank calls this (the sums are averaged over ranks)."""
        return {"sums": dist.mean_over_ranks(self.sums), "window": self.steps}

    def add_batch(self, losses: dict[str, torch.Tensor], *, accumulate: int, images: int) -> None:
        for k in LOSS_NAMES:
            self.sums[k] += float(losses[k].detach()) / accumulate
        self.images += images * dist.world_size()

    def close(self) -> tuple[dict[str, float], float]:
        """-> (each loss's mean over the window and the ranks, images per second); every rank calls
        this, and the window starts again."""
        means = dist.mean_over_ranks({k: v / self.steps for k, v in self.sums.items()})
        rate = self.images / max(time.perf_counter() - self.start, 1e-9)
        self.sums, self.steps = dict.fromkeys(LOSS_NAMES, 0.0), 0
        self.images, self.start = 0, time.perf_counter()
        return means, rate
