"""TensorBoard event files in the run folder: what metrics.csv holds, and the pictures and curves it cannot.

    board = RunBoard(run_dir, resume_iteration=None)        # rank 0 only; `tensorboard --logdir runs`
    board.train(iteration, {"loss": ..., "loss_objectness": ..., "lr": ..., "images_per_s": ...})
    board.evaluation(iteration, summary, per_class_ap, val_loss=..., pr=..., images=[...])

Tags: ``train/<loss>``, ``train/lr``, ``train/images_per_s`` at every logged window; ``val/AP`` ... ``val/APl``,
``val/VOC07_mAP50``, ``val/VOC_mAP50``, ``val/<loss>`` (the validation loss), ``val_AP_per_class/<class>``,
``pr_curve/<class>`` (precision-recall at IoU 0.5 over score thresholds, from the matched detections) and
``val_predictions/<n>`` (a few validation images, the same ones each time, with ground truth dashed and
predictions solid) at every evaluation. The step is the training iteration.

A resumed run appends to the same folder: the writer starts with TensorBoard's purge marker at the first
iteration after the checkpoint, so the events an interrupted run wrote past its checkpoint (work that is redone)
are dropped by TensorBoard's reader, and no step appears twice.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("fasterrcnn")


class RunBoard:
    def __init__(self, run_dir: str | Path, *, resume_iteration: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        purge = resume_iteration + 1 if resume_iteration is not None else None
        self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge, flush_secs=30)

    def train(self, iteration: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"train/{key}", float(value), iteration)
        self.writer.flush()

    def evaluation(
        self,
        iteration: int,
        summary: dict[str, float],
        *,
        per_class_ap: dict[str, float] | None = None,
        val_loss: dict[str, float] | None = None,
        pr=None,
        class_names: list[str] | None = None,
        images: list | None = None,
    ) -> None:
        """``summary``: the COCO and VOC numbers; ``pr``: a ``PRCounts`` (per class, over score thresholds);
        ``images``: PIL images to show (the same ones at each evaluation)."""
        for key, value in summary.items():
            self.writer.add_scalar(f"val/{key}", float(value), iteration)
        for key, value in (val_loss or {}).items():
            self.writer.add_scalar(f"val/{key}", float(value), iteration)
        for name, value in (per_class_ap or {}).items():
            if np.isfinite(value):
                self.writer.add_scalar(f"val_AP_per_class/{name}", float(value), iteration)
        if pr is not None and class_names is not None:
            for k in range(1, len(class_names)):
                if pr.num_gt[k - 1] == 0:
                    continue
                precision, recall = pr.precision_recall(k)
                tp, fp = pr.tp[k - 1], pr.fp[k - 1]
                self.writer.add_pr_curve_raw(
                    f"pr_curve/{class_names[k]}",
                    true_positive_counts=tp,
                    false_positive_counts=fp,
                    true_negative_counts=np.zeros_like(tp),
                    false_negative_counts=pr.num_gt[k - 1] - tp,
                    precision=precision,
                    recall=recall,
                    global_step=iteration,
                    num_thresholds=len(tp),
                )
        for n, image in enumerate(images or []):
            self.writer.add_image(f"val_predictions/{n}", np.asarray(image), iteration, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
