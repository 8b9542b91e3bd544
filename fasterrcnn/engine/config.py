"""Run configuration: typed dataclasses, read from YAML, overridden from the command line.

    cfg = load_config("my.yaml", overrides=["solver.lr=0.01", "train.iterations=2000"])

Unknown keys are errors (a typo must not silently train with a default), values are checked
against their declared types, and ``save_config`` writes the resolved config next to the run.
"""

import dataclasses
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..files import atomic_write_text
from ..model import BUILDERS
from ..model.loss_names import LOSS_NAMES
from .model_options import option_problem


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    # COCO: an instances json (images under `*_images`, or next to the json); VOC: a VOCdevkit root.
    # Empty train: the built-in synthetic dataset (generated once under synth_dir, then reused).
    train: str = ""
    train_images: str = ""
    val: str = ""
    val_images: str = ""
    format: str = "auto"  # auto | coco | voc
    voc_train_split: str = "train"
    voc_val_split: str = "val"
    voc_classes: list[str] = field(default_factory=list)
    synth_dir: str = "data/synth"
    synth_num_train: int = 1200
    synth_num_val: int = 200
    synth_size: list[int] = field(default_factory=lambda: [256, 320])  # H, W
    synth_seed: int = 0
    hflip: float = 0.5
    drop_empty: bool = False
    workers: int = 2
    aspect_grouping: bool = True


@dataclass
class ModelConfig:
    arch: str = "fasterrcnn_resnet50_fpn"
    weights: str = ""  # a torchvision-format detector checkpoint (path or URL); fine-tunes when classes differ
    weights_backbone: str = ""  # an ImageNet ResNet checkpoint, or a detector checkpoint whose backbone.body is taken
    trainable_backbone_layers: int | None = None
    # Keyword arguments for the builder / FasterRCNN (min_size, max_size, fpn_channels, rpn_*, box_*, ...),
    # checked against their signatures (names and types) and engine/model_options.RANGES
    options: dict = field(default_factory=dict)


@dataclass
class SolverConfig:
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    schedule: str = "multistep"  # multistep | cosine
    milestones: list[float] = field(default_factory=lambda: [0.75, 0.92])  # fractions of the run
    gamma: float = 0.1
    clip_grad_norm: float = 0.0  # 0: off
    accumulate: int = 1  # gradient accumulation steps per optimizer step
    loss_weights: dict = field(default_factory=lambda: dict.fromkeys(LOSS_NAMES, 1.0))


@dataclass
class TrainConfig:
    name: str = "demo"
    out_dir: str = "runs"
    iterations: int = 0  # optimizer steps; 0: use epochs
    epochs: int = 0
    batch_size: int = 4
    eval_every: int = 0  # iterations between evaluations; 0: at the end only
    checkpoint_every: int = 0  # iterations between last.pt saves; 0: at each evaluation and the end
    amp: str = "none"  # none | bf16 | fp16 (fp16 on CUDA only)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    log_every: int = 20
    threads: int = 0  # torch CPU threads; 0: PyTorch's default
    channels_last: bool = True  # NHWC weights and batches: faster convolutions, same results
    # joint: approximate joint training (the four losses at once). alternating: Ren et al.'s 4-step
    # training (RPN; detector on its proposals; RPN on the frozen detector backbone; detector heads),
    # see fasterrcnn/experiments/alternating.py.
    schedule: str = "joint"
    # the four steps' lengths: fractions of train.iterations (summing to 1) or iterations (summing to it);
    # the default has the 2:1:2:1 proportions of the reference implementation (80k/40k/80k/40k on VOC)
    alternating_iterations: list[float] = field(default_factory=lambda: [0.333333, 0.166667, 0.333333, 0.166667])
    alternating_detector_init: str = "initial"  # step 2's backbone: initial (the paper) | rpn (step 1's)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_type(value, annotation, where: str):
    """Validate (and lightly coerce: int -> float) ``value`` against a dataclass annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if annotation in (int, float, str, bool):
        if (annotation is int and isinstance(value, bool)) or not isinstance(value, annotation):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {annotation}")


def _apply(obj, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{path}' (known here: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, path)
        elif isinstance(current, dict) and isinstance(value, dict):
            # a mapping (model.options, solver.loss_weights) is updated key by key, so that
            # `model.options.fpn_norm=bn` adds to the options instead of replacing them all
            setattr(obj, key, {**current, **_check_type(value, hints[key], path)})
        else:
            setattr(obj, key, _check_type(value, hints[key], path))


def parse_override(text: str) -> dict:
    """'solver.lr=0.01' -> {'solver': {'lr': 0.01}}; the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot read the value: {e}") from None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def upgrade_legacy(values: dict) -> dict:
    """A config written by an older version, as this one reads it: ``train.alternating_step`` (an
    alternating step's run recorded its step there; the step is now an entry of its checkpoints) is
    dropped, and a step's config becomes the plain run of the trainer that it is."""
    train = values.get("train") if isinstance(values, dict) else None
    if not isinstance(train, dict) or "alternating_step" not in train:
        return values
    train = dict(train)
    if train.pop("alternating_step"):
        train["schedule"] = "joint"
    return {**values, "train": train}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), base: dict | None = None) -> Config:
    cfg = Config()
    if base:
        _apply(cfg, base, "")
    if path:
        path = Path(path)
        try:
            values = upgrade_legacy(yaml.safe_load(path.read_text()) or {})
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        try:
            _apply(cfg, values, "")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for text in overrides:
        try:
            _apply(cfg, parse_override(text), "")
        except ConfigError as e:
            raise ConfigError(f"command line: {e}") from None
    try:
        check_values(cfg)
    except ConfigError as e:
        source = f"{path}" + (" with command-line overrides" if overrides else "") if path else "command line"
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def _alternating_problem(t: TrainConfig) -> str | None:
    """What is wrong with the four step lengths of an alternating run (None: nothing)."""
    split = t.alternating_iterations
    if len(split) != 4 or not all(math.isfinite(x) and x > 0 for x in split):
        return "four positive numbers, one per step"
    if t.epochs and not t.iterations:
        return "set with train.iterations (the alternating schedule counts iterations, not epochs)"
    if all(x < 1 for x in split):
        if abs(sum(split) - 1) > 1e-6:
            return "fractions of train.iterations summing to 1"
        if (
            t.iterations < 4
            or min(round(x * t.iterations) for x in split[:3]) < 1
            or t.iterations - sum(round(x * t.iterations) for x in split[:3]) < 1
        ):
            return f"fractions that give each step at least one of train.iterations={t.iterations}"
        return None
    if not all(x >= 1 and float(x).is_integer() for x in split):
        return "all fractions (below 1) or all whole iteration counts (from 1)"
    if t.iterations not in (0, int(sum(split))):
        return f"iteration counts whose sum matches train.iterations={t.iterations}"
    return None


def check_values(cfg: Config) -> None:
    """Values out of range are refused before any work starts; each message names the key, the value
    and what is allowed."""

    def need(cond, key, value, allowed):
        if not cond:
            raise ConfigError(f"{key} must be {allowed}, got {value!r}")

    def finite(v):
        return math.isfinite(v)

    t, s, d, m = cfg.train, cfg.solver, cfg.data, cfg.model
    # train
    need(t.name.strip() != "", "train.name", t.name, "a non-empty folder name")
    need(
        t.name not in (".", "..") and not re.search(r"[/\\]", t.name),
        "train.name",
        t.name,
        "a plain folder name (no / or \\, not . or ..): the run folder is train.out_dir/train.name",
    )
    need(t.out_dir.strip() != "", "train.out_dir", t.out_dir, "a non-empty folder")
    need(t.batch_size >= 1, "train.batch_size", t.batch_size, ">= 1")
    need(t.iterations >= 0, "train.iterations", t.iterations, ">= 0 (0: use train.epochs)")
    need(t.epochs >= 0, "train.epochs", t.epochs, ">= 0")
    need(t.eval_every >= 0, "train.eval_every", t.eval_every, ">= 0 (0: at the end only)")
    need(t.checkpoint_every >= 0, "train.checkpoint_every", t.checkpoint_every, ">= 0 (0: at each evaluation)")
    need(t.amp in ("none", "bf16", "fp16"), "train.amp", t.amp, "none, bf16 or fp16")
    need(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None,
        "train.device",
        t.device,
        "auto, cpu, cuda or cuda:N",
    )
    need(0 <= t.seed < 2**32, "train.seed", t.seed, "in [0, 2**32)")
    need(t.log_every >= 1, "train.log_every", t.log_every, ">= 1")
    need(t.threads >= 0, "train.threads", t.threads, ">= 0 (0: PyTorch's default)")
    need(t.schedule in ("joint", "alternating"), "train.schedule", t.schedule, "joint or alternating")
    need(
        t.alternating_detector_init in ("initial", "rpn"),
        "train.alternating_detector_init",
        t.alternating_detector_init,
        "initial or rpn",
    )
    if t.schedule == "alternating":
        problem = _alternating_problem(t)
        need(problem is None, "train.alternating_iterations", t.alternating_iterations, problem)
    # solver
    need(s.optimizer in ("sgd", "adamw"), "solver.optimizer", s.optimizer, "sgd or adamw")
    need(s.schedule in ("multistep", "cosine"), "solver.schedule", s.schedule, "multistep or cosine")
    need(finite(s.lr) and s.lr > 0, "solver.lr", s.lr, "> 0")
    need(0 <= s.momentum < 1, "solver.momentum", s.momentum, "in [0, 1)")
    need(finite(s.weight_decay) and s.weight_decay >= 0, "solver.weight_decay", s.weight_decay, ">= 0")
    need(s.warmup_iters >= 0, "solver.warmup_iters", s.warmup_iters, ">= 0")
    need(0 < s.warmup_factor <= 1, "solver.warmup_factor", s.warmup_factor, "in (0, 1]")
    need(
        all(finite(x) and x > 0 for x in s.milestones),
        "solver.milestones",
        s.milestones,
        "positive (below 1: fractions of the run; from 1: iterations)",
    )
    need(finite(s.gamma) and s.gamma > 0, "solver.gamma", s.gamma, "> 0")
    need(finite(s.clip_grad_norm) and s.clip_grad_norm >= 0, "solver.clip_grad_norm", s.clip_grad_norm, ">= 0 (0: off)")
    need(s.accumulate >= 1, "solver.accumulate", s.accumulate, ">= 1")
    unknown = sorted(set(s.loss_weights) - set(LOSS_NAMES))
    need(not unknown, "solver.loss_weights", unknown, f"among {', '.join(LOSS_NAMES)} (unknown losses)")
    for k, w in s.loss_weights.items():
        ok = isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
        need(ok, f"solver.loss_weights.{k}", w, "a number >= 0")
    # data
    need(d.format in ("auto", "coco", "voc"), "data.format", d.format, "auto, coco or voc")
    need(d.voc_train_split.strip() != "", "data.voc_train_split", d.voc_train_split, "a split name")
    need(d.voc_val_split.strip() != "", "data.voc_val_split", d.voc_val_split, "a split name")
    need(
        len(set(d.voc_classes)) == len(d.voc_classes) and all(c.strip() for c in d.voc_classes),
        "data.voc_classes",
        d.voc_classes,
        "distinct, non-empty names (empty list: the 20 VOC classes)",
    )
    need(d.synth_dir.strip() != "", "data.synth_dir", d.synth_dir, "a folder")
    need(d.synth_num_train >= 1, "data.synth_num_train", d.synth_num_train, ">= 1")
    need(d.synth_num_val >= 1, "data.synth_num_val", d.synth_num_val, ">= 1")
    need(len(d.synth_size) == 2 and min(d.synth_size) >= 32, "data.synth_size", d.synth_size, "[H, W], each >= 32")
    need(d.synth_seed >= 0, "data.synth_seed", d.synth_seed, ">= 0")
    need(0.0 <= d.hflip <= 1.0, "data.hflip", d.hflip, "a probability in [0, 1]")
    need(d.workers >= 0, "data.workers", d.workers, ">= 0 (0: load in the training process)")
    # model: the builder, and the options it takes, by its signature (engine/model_options.py)
    need(m.arch in BUILDERS, "model.arch", m.arch, f"a builder name, one of {', '.join(sorted(BUILDERS))}")
    tbl = m.trainable_backbone_layers
    need(tbl is None or 0 <= tbl <= 5, "model.trainable_backbone_layers", tbl, "null or in [0, 5]")
    for key, value in m.options.items():
        problem = option_problem(m.arch, key, value)
        if problem:
            raise ConfigError(problem)


def config_from_dict(values: dict) -> Config:
    """A Config from a (saved, resolved) dict, checked like a YAML file."""
    cfg = Config()
    _apply(cfg, upgrade_legacy(values), "")
    check_values(cfg)
    return cfg


# What --resume may change: how the run is executed, not what it computes. Everything else would make
# the resumed run a different run from the one its checkpoint belongs to.
EXECUTION_KEYS = ("data.workers", "train.threads", "train.device", "train.log_every")
# The validation set (data.val, data.val_images) changes what is evaluated, not the weights: a wrong
# validation image folder found by a run can be fixed on resume.
RESUME_OVERRIDABLE = (*EXECUTION_KEYS, "data.val", "data.val_images")


def apply_overrides(
    cfg: Config, overrides: list[str], *, allowed: tuple[str, ...] | None = None, context: str = ""
) -> Config:
    """A new Config: ``cfg`` with ``section.key=value`` overrides (restricted to ``allowed`` keys), checked."""
    out = config_from_dict(cfg.to_dict())
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if allowed is not None and key not in allowed:
            raise ConfigError(f"{context}cannot change {key!r}: only {', '.join(allowed)} may be set")
        _apply(out, parse_override(text), "")
    check_values(out)
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
