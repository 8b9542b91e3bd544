"""The paper's experiments as a grid: one factor at a time around a baseline, a fixed budget per cell.

    fasterrcnn ablate --iterations 300 --out runs/ablation

The baseline is the demo recipe (or ``--config``) with ``train.iterations`` set to the budget and
its warmup scaled with it; each cell changes one thing. A cell is a training run in <out>/<cell>/,
or, for a test-time setting, a re-evaluation of another cell's model. Its result goes to
<out>/<cell>/result.json with the hash of its resolved config: a cell finished with the same config
is not run again, a stopped one continues from its last.pt, and one whose config has changed is
moved aside (<cell>.stale-<hash>) and run anew. <out>/ablation.md holds the table and the command
that made it, <out>/ablation.png the plot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..engine.checkpoint import load_checkpoint
from ..engine.config import EXECUTION_KEYS, Config, ConfigError, apply_overrides, config_from_dict, load_config
from ..engine.evaluator import evaluate_model
from ..engine.setup import build_data, build_model, resolve_device
from ..files import atomic_write_text
from ..viz.ablation import plot_ablation
from .alternating import AlternatingResult, latest_checkpoint
from .schedules import train_schedule

log = logging.getLogger("fasterrcnn")
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass(frozen=True)
class Cell:
    """One experiment: ``overrides`` on the baseline (after removing ``drop_options`` from
    model.options, for builders that do not take them). With ``reevaluates``, no training: that
    cell's model is evaluated again with ``overrides`` (model.options read at test time only).
    With ``backbone_from``, the backbone's trunk starts from that cell's trained model
    (``model.weights_backbone``: FrozenBatchNorm, the stem and layer1 frozen, as with ImageNet
    weights), the FPN and heads from scratch: the paper's setting of a pretrained backbone."""

    name: str
    overrides: tuple[str, ...] = ()
    drop_options: tuple[str, ...] = ()
    reevaluates: str = ""
    description: str = ""
    backbone_from: str = ""
    tta: tuple[float, ...] = ()  # a re-evaluation with test-time augmentation at these scales, and mirrored

    @property
    def depends_on(self) -> str:
        return self.reevaluates or self.backbone_from

    def describe_overrides(self) -> str:
        parts = [f"`{o}`" for o in self.overrides]
        if self.drop_options:
            parts.append("without " + ", ".join(f"`model.options.{k}`" for k in self.drop_options))
        if self.tta:
            parts.append(f"test-time augmentation: scales {', '.join(f'{x:g}' for x in self.tta)}, mirrored")
        if self.reevaluates:
            parts.append(f"({self.reevaluates}'s model, re-evaluated)")
        if self.backbone_from:
            parts.append(f"(backbone from {self.backbone_from}'s model)")
        return " ".join(parts) or "(none)"


def _lam(value: int) -> tuple[str, ...]:
    return (f"solver.loss_weights.loss_rpn_box_reg={value}", f"solver.loss_weights.loss_box_reg={value}")


BUILTIN_CELLS: tuple[Cell, ...] = (
    Cell("baseline", description="the demo recipe at the budget"),
    Cell(
        "baseline_seed1",
        ("train.seed=1",),
        description="the baseline with another seed: how far apart two runs of one recipe land",
    ),
    Cell(
        "anchors_32-512",
        ("model.options.anchor_sizes=[32, 64, 128, 256, 512]",),
        description="torchvision's anchor sizes instead of the demo's 16..256",
    ),
    Cell(
        "rpn_iou_0.5-0.1",
        ("model.options.rpn_fg_iou_thresh=0.5", "model.options.rpn_bg_iou_thresh=0.1"),
        description="RPN positives from IoU 0.5, negatives below 0.1 (baseline 0.7 / 0.3)",
    ),
    Cell("lambda_5", _lam(5), description="box regression losses weighted 5 (baseline 1)"),
    Cell("lambda_10", _lam(10), description="box regression losses weighted 10"),
    Cell("rpn_nms_0.5", ("model.options.rpn_nms_thresh=0.5",), description="RPN NMS at IoU 0.5 (baseline 0.7)"),
    Cell("rpn_nms_0.9", ("model.options.rpn_nms_thresh=0.9",), description="RPN NMS at IoU 0.9"),
    Cell("roi_5", ("model.options.roi_output_size=5",), description="5x5 RoI features (baseline 7x7)"),
    Cell("roi_14", ("model.options.roi_output_size=14",), description="14x14 RoI features"),
    Cell("roi_pool", ("model.options.roi_op=roi_pool",), description="RoIPool instead of RoIAlign"),
    Cell(
        "single_map",
        ("model.arch=fasterrcnn_resnet18_c4",),
        drop_options=("fpn_channels", "fpn_norm"),
        description="one feature map (ResNet-18 C4, stride 16, all anchor sizes on it) instead of the FPN",
    ),
    Cell(
        "test_proposals_100",
        ("model.options.rpn_post_nms_top_n_test=100",),
        reevaluates="baseline",
        description="100 proposals per image at test time (baseline 300)",
    ),
    Cell(
        "test_proposals_1000",
        ("model.options.rpn_pre_nms_top_n_test=1000", "model.options.rpn_post_nms_top_n_test=1000"),
        reevaluates="baseline",
        description="1000 proposals per image at test time",
    ),
    Cell(
        "alternating",
        ("train.schedule=alternating",),
        description="4-step alternating training (the paper's: step 2 from the initial backbone; steps 2:1:2:1)",
    ),
    Cell(
        "alternating_rpn_init",
        (
            "train.schedule=alternating",
            "train.alternating_detector_init=rpn",
            "train.alternating_iterations=[0.4, 0.3, 0.2, 0.1]",
        ),
        description="4-step alternating training, step 2 from step 1's backbone, steps 4:3:2:1",
    ),
    Cell(
        "joint_pretrained",
        backbone_from="baseline",
        description="joint training from a pretrained backbone (the baseline's trunk; FPN and heads new)",
    ),
    Cell(
        "alternating_pretrained",
        ("train.schedule=alternating",),
        backbone_from="baseline",
        description="the paper's 4-step alternating training from the same pretrained backbone",
    ),
    # issue 19: what came after the 2015 detector, each with the baseline's two seeds
    *(
        Cell(
            f"cascade{suffix}",
            ("model.options.cascade_iou=[0.5, 0.6, 0.7]", *seed),
            description="Cascade R-CNN: three second stages trained at IoU 0.5, 0.6, 0.7, losses weighted 1, 0.5, 0.25"
            + (", seed 1" if seed else ""),
        )
        for suffix, seed in (("", ()), ("_seed1", ("train.seed=1",)))
    ),
    *(
        Cell(
            f"giou{suffix}",
            ("model.options.box_loss=giou", "solver.loss_weights.loss_box_reg=10", *seed),
            description="GIoU loss on the second stage's decoded boxes, weighted 10 (mmdetection's recipe)"
            + (", seed 1" if seed else ""),
        )
        for suffix, seed in (("", ()), ("_seed1", ("train.seed=1",)))
    ),
    *(
        Cell(
            f"giou_w1{suffix}",
            ("model.options.box_loss=giou", *seed),
            description="GIoU loss on the second stage's decoded boxes, weighted 1 (as smooth L1 is)"
            + (", seed 1" if seed else ""),
        )
        for suffix, seed in (("", ()), ("_seed1", ("train.seed=1",)))
    ),
    *(
        Cell(
            f"soft_nms{suffix}",
            ("model.options.box_nms=soft_gaussian",),
            reevaluates=f"baseline{suffix}",
            description="Soft-NMS (Gaussian, sigma 0.5) in the second stage instead of NMS at 0.5",
        )
        for suffix in ("", "_seed1")
    ),
    *(
        Cell(
            f"tta{suffix}",
            reevaluates=f"baseline{suffix}",
            tta=(0.8, 1.0, 1.2),
            description="test-time augmentation: three sizes, each also mirrored, merged by class-wise NMS",
        )
        for suffix in ("", "_seed1")
    ),
)


@dataclass
class CellResult:
    cell: Cell
    metrics: dict[str, float]
    train_s: float  # training wall time (0 for a re-evaluation)
    eval_s: float  # the evaluation(s)' wall time
    config_hash: str
    reused: bool = False  # read from an earlier invocation's result.json
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "cell": self.cell.name,
            "overrides": list(self.cell.overrides),
            "drop_options": list(self.cell.drop_options),
            "reevaluates": self.cell.reevaluates,
            "config_hash": self.config_hash,
            **self.metrics,
            "train_s": self.train_s,
            "eval_s": self.eval_s,
            "notes": self.notes,
        }


def select_cells(names: list[str] | None, cells: tuple[Cell, ...] = BUILTIN_CELLS) -> list[Cell]:
    """The named cells (all when ``names`` is empty) in grid order, with the cells they re-evaluate."""
    by_name = {c.name: c for c in cells}
    names = list(names or by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError(f"unknown ablation cell(s) {unknown}; the cells are: {', '.join(by_name)}")
    wanted = set(names) | {by_name[n].depends_on for n in names if by_name[n].depends_on}
    return [c for c in cells if c.name in wanted]


def base_config(
    *,
    config: str | Path | None = None,
    iterations: int | None = None,
    data: list[str] | tuple[str, ...] = (),
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
    """The baseline: ``config`` (default: the demo recipe) with the budget of ``iterations`` (its
    warmup scaled in proportion), the data (a synthetic-data folder, or COCO jsons: train [val]),
    then ``overrides``, which apply to every cell."""
    cfg = load_config(config or DEMO_CONFIG)
    budget = []
    if iterations is not None:
        if iterations < 1:
            raise ConfigError(f"--iterations must be >= 1, got {iterations}")
        if cfg.train.iterations:
            budget.append(f"solver.warmup_iters={round(cfg.solver.warmup_iters * iterations / cfg.train.iterations)}")
        budget += [f"train.iterations={iterations}", "train.epochs=0"]
    return apply_overrides(cfg, budget + data_overrides(data) + list(overrides))


def data_overrides(data: list[str] | tuple[str, ...]) -> list[str]:
    if not data:
        return []
    if len(data) > 2:
        raise ConfigError(f"--data takes a synthetic-data folder or one or two COCO jsons (train, val), got {data}")
    paths = [str(Path(p)) for p in data]
    if len(paths) == 1 and not paths[0].endswith(".json"):
        return ["data.train=", f"data.synth_dir={json.dumps(paths[0])}"]
    out = [f"data.train={json.dumps(paths[0])}", "data.format=coco"]
    return out + ([f"data.val={json.dumps(paths[1])}"] if len(paths) == 2 else [])


def cell_config(base: Config, cell: Cell, out: Path) -> Config:
    values = base.to_dict()
    for key in cell.drop_options:
        values["model"]["options"].pop(key, None)
    values["train"].update(out_dir=str(out), name=cell.name)
    if cell.backbone_from:
        values["model"]["weights_backbone"] = str(Path(out) / cell.backbone_from / "last.pt")
    return apply_overrides(config_from_dict(values), list(cell.overrides))


def config_hash(cfg: Config, *extra: str) -> str:
    """What a cell computes: the resolved config without where it runs or how it is executed."""
    values = cfg.to_dict()
    for key in (*EXECUTION_KEYS, "train.out_dir", "train.name"):
        section, name = key.split(".")
        values[section].pop(name, None)
    text = json.dumps([values, *extra], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_result(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _set_aside(run_dir: Path, old_hash: str) -> None:
    target = run_dir.with_name(f"{run_dir.name}.stale-{old_hash}")
    n = 1
    while target.exists():
        target, n = run_dir.with_name(f"{run_dir.name}.stale-{old_hash}-{n}"), n + 1
    run_dir.rename(target)
    log.warning("%s was run with another config: moved to %s, running it anew", run_dir, target)


def _existing_hash(run_dir: Path, *extra: str) -> str | None:
    """The config hash of what ``run_dir`` holds (its result.json, else its config.yaml and
    ``extra``, as ``config_hash`` takes them), if anything."""
    result = _read_result(run_dir / "result.json")
    if result is not None:
        return str(result.get("config_hash"))
    if (run_dir / "config.yaml").is_file():
        try:
            return config_hash(config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text())), *extra)
        except (ConfigError, yaml.YAMLError, TypeError):
            return "unreadable"
    return None


def _eval_metrics(evaluation, run_dir: Path) -> dict[str, float]:
    if evaluation is not None:
        summary = evaluation.summary()
        return {k: float(summary[k]) for k in METRICS}
    saved = _read_result(run_dir / "eval.json")
    if saved is None:
        raise ConfigError(f"{run_dir} finished without an evaluation (no eval.json)")
    return {k: float(saved[k]) for k in METRICS}


def run_training_cell(cell: Cell, cfg: Config, digest: str, *, show_progress: bool) -> CellResult:
    run_dir = Path(cfg.train.out_dir) / cfg.train.name
    checkpoint = latest_checkpoint(run_dir)
    notes = [f"continued from {checkpoint}"] if checkpoint else []
    execution = [
        f"{k}={json.dumps(v)}"
        for k, v in (
            ("data.workers", cfg.data.workers),
            ("train.threads", cfg.train.threads),
            ("train.device", cfg.train.device),
            ("train.log_every", cfg.train.log_every),
        )
    ]
    start = time.perf_counter()
    result = train_schedule(
        cfg,
        resume=str(checkpoint) if checkpoint else None,
        resume_overrides=execution if checkpoint else (),
        show_progress=show_progress,
    )
    wall = time.perf_counter() - start
    if isinstance(result, AlternatingResult):
        eval_s = result.eval_seconds
    else:
        eval_s = result.evaluation.seconds if result.evaluation is not None else 0.0
    return CellResult(cell, _eval_metrics(result.evaluation, run_dir), wall - eval_s, eval_s, digest, notes=notes)


def reevaluation_hash(cfg: Config, cell: Cell, reference_hash: str) -> str:
    """A re-evaluation cell's key: the trained cell's, its test-time overrides and its augmentation."""
    return config_hash(cfg, reference_hash, *cell.overrides, *(f"tta={x}" for x in cell.tta))


def run_reevaluation_cell(cell: Cell, cfg: Config, reference: CellResult, *, show_progress: bool) -> CellResult:
    """``reference``'s trained model, evaluated with the cell's test-time model.options."""
    bad = [o for o in cell.overrides if not o.startswith("model.options.")]
    if bad:
        raise ConfigError(f"cell {cell.name} re-evaluates {cell.reevaluates}: only model.options may change, not {bad}")
    out = Path(cfg.train.out_dir)
    state = load_checkpoint(out / reference.cell.name / "last.pt")
    trained = config_from_dict(state["config"])
    eval_cfg = apply_overrides(trained, list(cell.overrides))
    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    model = build_model(eval_cfg.model, num_classes=len(state["class_names"]))
    model.load_state_dict(state["model"])
    model.to(device)
    if eval_cfg.train.channels_last:
        model.to_channels_last()
    data = build_data(eval_cfg.data, train=False)
    run_dir = out / cell.name
    run_dir.mkdir(parents=True, exist_ok=True)
    evaluation = evaluate_model(
        model,
        data.val,
        class_names=data.class_names,
        label_to_cat_id=data.label_to_cat_id,
        ann_file=data.val_ann_file,
        batch_size=cfg.train.batch_size,
        device=device,
        amp=cfg.train.amp,
        show_progress=show_progress,
        results_path=run_dir / "predictions.json",
        tta={"scales": cell.tta, "hflip": True} if cell.tta else None,
    )
    evaluation.coco.to_json(run_dir / "eval.json")
    digest = reevaluation_hash(cfg, cell, reference.config_hash)
    return CellResult(cell, _eval_metrics(evaluation, run_dir), 0.0, evaluation.seconds, digest)


def run_ablation(
    base: Config, *, out: str | Path, cells: list[Cell], command: str = "", show_progress: bool = True
) -> list[CellResult]:
    """Run (or re-use) every cell, then write <out>/ablation.md and <out>/ablation.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, CellResult] = {}
    # cells that start from nothing first: the others need their models
    for i, cell in enumerate(sorted(cells, key=lambda c: (bool(c.backbone_from), bool(c.reevaluates))), 1):
        cfg = cell_config(base, cell, out)
        run_dir = out / cell.name
        if cell.reevaluates:
            digest = reevaluation_hash(cfg, cell, results[cell.reevaluates].config_hash)
        elif cell.backbone_from:  # what it computes depends on what the donor learned
            digest = config_hash(cfg, results[cell.backbone_from].config_hash)
        else:
            digest = config_hash(cfg)
        saved = _read_result(run_dir / "result.json")
        if saved is not None and saved.get("config_hash") == digest:
            log.info(
                "ablation cell %d/%d %s: re-used (%s, same config)", i, len(cells), cell.name, run_dir / "result.json"
            )
            results[cell.name] = CellResult(
                cell,
                {k: float(saved[k]) for k in METRICS},
                float(saved["train_s"]),
                float(saved["eval_s"]),
                digest,
                reused=True,
                notes=list(saved.get("notes", [])),
            )
            continue
        existing = _existing_hash(run_dir, *([results[cell.backbone_from].config_hash] if cell.backbone_from else []))
        if existing is not None and existing != digest and not cell.reevaluates:
            _set_aside(run_dir, existing)
        log.info(
            "ablation cell %d/%d %s: %s",
            i,
            len(cells),
            cell.name,
            f"re-evaluating {cell.reevaluates}'s model"
            if cell.reevaluates
            else f"training {cfg.train.iterations} iterations of batch {cfg.train.batch_size}",
        )
        if cell.reevaluates:
            result = run_reevaluation_cell(cell, cfg, results[cell.reevaluates], show_progress=show_progress)
        else:
            result = run_training_cell(cell, cfg, digest, show_progress=show_progress)
        atomic_write_text(run_dir / "result.json", json.dumps(result.to_json(), indent=2))
        log.info(
            "ablation cell %s: AP %.3f AP50 %.3f AP_small %.3f, training %.0f s, evaluation %.0f s",
            cell.name,
            result.metrics["AP"],
            result.metrics["AP50"],
            result.metrics["APs"],
            result.train_s,
            result.eval_s,
        )
        results[cell.name] = result
    ordered = [results[c.name] for c in cells]
    atomic_write_text(out / "ablation.md", format_table(ordered, base, command=command))
    plot_ablation(
        [{"cell": r.cell.name, **r.metrics, "train_s": r.train_s, "eval_s": r.eval_s} for r in ordered],
        out / "ablation.png",
    )
    log.info("ablation: %s, %s", out / "ablation.md", out / "ablation.png")
    return ordered


def format_table(results: list[CellResult], base: Config, *, command: str = "") -> str:
    t = base.train
    lines = [f"# Ablation: {t.iterations} iterations of batch {t.batch_size} per cell", ""]
    if command:
        lines += ["Made by:", "", "```", command, "```", ""]
    lines += [
        "COCO AP, AP50 and AP_small on the validation set; one change per row against the baseline; "
        "training time is wall time without the evaluation.",
        "",
        "| cell | overrides | AP | AP50 | AP_small | training time | evaluation time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r.metrics
        train_time = "-" if r.cell.reevaluates else f"{r.train_s:.0f} s"
        lines.append(
            f"| {r.cell.name} | {r.cell.describe_overrides()} | {m['AP']:.3f} | {m['AP50']:.3f} | "
            f"{m['APs']:.3f} | {train_time} | {r.eval_s:.0f} s |"
        )
    notes = [f"{r.cell.name}: {n}" for r in results for n in r.notes]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


def command_line(argv: list[str]) -> str:
    return shlex.join(["fasterrcnn", "ablate", *argv])
