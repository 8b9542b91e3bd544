"""Run configuration: typed dataclasses, read from YAML, overridden from the command line.

    cfg = load_config("my.yaml", overrides=["solver.lr=0.01", "train.iterations=2000"])

Unknown keys are errors (a typo must not silently train with a default), values are checked
against their declared types, and ``save_config`` writes the resolved config next to the run.
"""
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


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
    weights_backbone: str = ""  # an ImageNet ResNet checkpoint (path or URL)
    trainable_backbone_layers: int | None = None
    # Keyword arguments for the builder / FasterRCNN (min_size, max_size, fpn_channels, rpn_*, box_*, ...)
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
    loss_weights: dict = field(default_factory=lambda: {
        "loss_objectness": 1.0, "loss_rpn_box_reg": 1.0, "loss_classifier": 1.0, "loss_box_reg": 1.0})


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
        if annotation is int and isinstance(value, bool) or not isinstance(value, annotation):
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


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    cfg = Config()
    if base:
        _apply(cfg, base, "")
    if path:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        try:
            _apply(cfg, values, "")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for text in overrides:
        _apply(cfg, parse_override(text), "")
    try:
        validate(cfg)
    except ConfigError as e:
        source = f"{path}" + (" with command-line overrides" if overrides else "") if path else "command line"
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def validate(cfg: Config) -> None:
    """Values out of range are refused before any work starts."""
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)
    t, s, d = cfg.train, cfg.solver, cfg.data
    need(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    need(t.iterations >= 0 and t.epochs >= 0, "train.iterations and train.epochs must be >= 0")
    need(t.amp in ("none", "bf16", "fp16"), f"train.amp must be none, bf16 or fp16, got {t.amp!r}")
    need(s.optimizer in ("sgd", "adamw"), f"solver.optimizer must be sgd or adamw, got {s.optimizer!r}")
    need(s.schedule in ("multistep", "cosine"), f"solver.schedule must be multistep or cosine, got {s.schedule!r}")
    need(s.lr > 0, f"solver.lr must be > 0, got {s.lr}")
    need(s.accumulate >= 1, f"solver.accumulate must be >= 1, got {s.accumulate}")
    need(s.warmup_iters >= 0 and 0 < s.warmup_factor <= 1, "solver.warmup_iters >= 0 and 0 < solver.warmup_factor <= 1")
    need(all(m > 0 for m in s.milestones), f"solver.milestones must be positive, got {s.milestones}")
    unknown = set(s.loss_weights) - {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    need(not unknown, f"solver.loss_weights has unknown losses: {sorted(unknown)}")
    need(d.format in ("auto", "coco", "voc"), f"data.format must be auto, coco or voc, got {d.format!r}")
    need(0.0 <= d.hflip <= 1.0, f"data.hflip must be a probability, got {d.hflip}")
    need(len(d.synth_size) == 2 and min(d.synth_size) >= 32, f"data.synth_size must be [H, W] >= 32, got {d.synth_size}")
    need(d.workers >= 0, f"data.workers must be >= 0, got {d.workers}")


def config_from_dict(values: dict) -> Config:
    """A Config from a (saved, resolved) dict, checked like a YAML file."""
    cfg = Config()
    _apply(cfg, values, "")
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
