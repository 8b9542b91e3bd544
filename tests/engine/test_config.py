import pytest

from fasterrcnn.engine.config import ConfigError, config_from_dict, load_config, parse_override


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("solver:\n  lr: 0.05\ntrain:\n  iterations: 10\nmodel:\n  options: {min_size: 300}\n")
    cfg = load_config(path, overrides=["train.iterations=20", "solver.milestones=[0.5, 0.9]"])
    assert cfg.solver.lr == 0.05 and cfg.train.iterations == 20 and cfg.solver.milestones == [0.5, 0.9]
    assert cfg.model.options == {"min_size": 300}
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize(
    "text, message",
    [
        ("solver:\n  lrr: 0.1\n", "unknown config key 'solver.lrr'"),
        ("trainer:\n  x: 1\n", "unknown config key 'trainer'"),
        ("train:\n  batch_size: two\n", "train.batch_size: expected int"),
        ("train:\n  batch_size: 0\n", "train.batch_size must be >= 1"),
        ("train:\n  amp: fp8\n", "train.amp must be none, bf16 or fp16"),
        ("solver:\n  lr: -1\n", "solver.lr must be > 0"),
        ("solver:\n  loss_weights: {loss_mask: 1}\n", "unknown losses"),
        ("data:\n  synth_size: [16]\n", "data.synth_size"),
        ("train: [1, 2\n", "not valid YAML"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(path)
    assert "bad.yaml" in str(e.value)


def test_override_errors():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(overrides=["solver.lr"])
    with pytest.raises(ConfigError, match="unknown config key 'solver.nope'"):
        load_config(overrides=["solver.nope=1"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/x.yaml")


def test_mapping_overrides_merge_instead_of_replacing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  options: {min_size: 256, max_size: 320}\n")
    cfg = load_config(path, overrides=["model.options.fpn_norm=bn", "solver.loss_weights.loss_box_reg=2"])
    assert cfg.model.options == {"min_size": 256, "max_size": 320, "fpn_norm": "bn"}
    assert cfg.solver.loss_weights["loss_box_reg"] == 2 and cfg.solver.loss_weights["loss_classifier"] == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.name=''", "train.name must be a non-empty folder name"),
        ("train.out_dir=' '", "train.out_dir must be a non-empty folder"),
        ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
        ("train.iterations=-1", "train.iterations must be >= 0"),
        ("train.epochs=-2", "train.epochs must be >= 0, got -2"),
        ("train.eval_every=-1", "train.eval_every must be >= 0"),
        ("train.checkpoint_every=-5", "train.checkpoint_every must be >= 0"),
        ("train.amp=fp8", "train.amp must be none, bf16 or fp16, got 'fp8'"),
        ("train.device=gpu", "train.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("train.seed=-1", r"train.seed must be in \[0, 2\*\*32\), got -1"),
        ("train.log_every=0", "train.log_every must be >= 1, got 0"),
        ("train.threads=-1", "train.threads must be >= 0"),
        ("solver.optimizer=adam", "solver.optimizer must be sgd or adamw, got 'adam'"),
        ("solver.schedule=linear", "solver.schedule must be multistep or cosine"),
        ("solver.lr=0", "solver.lr must be > 0, got 0.0"),
        ("solver.lr=.inf", "solver.lr must be > 0, got inf"),
        ("solver.momentum=1.0", r"solver.momentum must be in \[0, 1\), got 1.0"),
        ("solver.weight_decay=-0.1", "solver.weight_decay must be >= 0"),
        ("solver.warmup_iters=-1", "solver.warmup_iters must be >= 0"),
        ("solver.warmup_factor=0", r"solver.warmup_factor must be in \(0, 1\]"),
        ("solver.milestones=[0.5, -1]", "solver.milestones must be positive"),
        ("solver.gamma=0", "solver.gamma must be > 0"),
        ("solver.clip_grad_norm=-1", "solver.clip_grad_norm must be >= 0"),
        ("solver.accumulate=0", "solver.accumulate must be >= 1"),
        ("solver.loss_weights.loss_mask=1", "unknown losses"),
        ("solver.loss_weights.loss_box_reg=-1", "solver.loss_weights.loss_box_reg must be a number >= 0, got -1"),
        ("data.format=yolo", "data.format must be auto, coco or voc, got 'yolo'"),
        ("data.voc_train_split=''", "data.voc_train_split must be a split name"),
        ("data.voc_val_split=''", "data.voc_val_split must be a split name"),
        ("data.voc_classes=[a, a]", "data.voc_classes must be distinct, non-empty names"),
        ("data.synth_dir=''", "data.synth_dir must be a folder"),
        ("data.synth_num_train=0", "data.synth_num_train must be >= 1"),
        ("data.synth_num_val=0", "data.synth_num_val must be >= 1"),
        ("data.synth_size=[16, 320]", r"data.synth_size must be \[H, W\], each >= 32, got \[16, 320\]"),
        ("data.synth_seed=-3", "data.synth_seed must be >= 0"),
        ("data.hflip=1.5", r"data.hflip must be a probability in \[0, 1\], got 1.5"),
        ("data.workers=-1", r"data.workers must be >= 0 \(0: load in the training process\), got -1"),
        ("model.arch=''", "model.arch must be a builder name"),
        ("model.trainable_backbone_layers=6", r"model.trainable_backbone_layers must be null or in \[0, 5\], got 6"),
        ("model.options.box_nms_thresh=1.5", r"model.options.box_nms_thresh must be a number in \[0, 1\], got 1.5"),
        ("model.options.rpn_fg_iou_thresh=-0.1", r"model.options.rpn_fg_iou_thresh must be a number in \[0, 1\]"),
        ("model.options.box_positive_fraction=0", r"model.options.box_positive_fraction must be a number in \(0, 1\]"),
        ("model.options.rpn_post_nms_top_n_train=0", "model.options.rpn_post_nms_top_n_train must be an integer >= 1"),
        ("model.options.min_size=[800, 0]", "model.options.min_size must be an integer >= 1 or a list of them"),
        ("model.options.anchor_sizes=32", "model.options.anchor_sizes must be a list of integers >= 1"),
        ("model.options.fpn_norm=ln", "model.options.fpn_norm must be one of none, bn, gn, got 'ln'"),
        ("train.batch_size=two", "train.batch_size: expected int, got 'two'"),
    ],
)
def test_every_out_of_range_value_names_the_key_the_value_and_the_range(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(overrides=["train.iterations=10", override])
    assert "command line" in str(e.value)


@pytest.mark.parametrize(
    "options, message",
    [
        (
            "{nms_thresh: 0.5}",
            r"model.options.nms_thresh: not an option of fasterrcnn_resnet50_fpn \(it takes .*rpn_nms_thresh",
        ),
        ("{fpn_channels: 64}", "model.options.fpn_channels: not an option of fasterrcnn_resnet50_c4"),
        ("{max_size: big}", "model.options.max_size must be an integer >= 1, got 'big'"),
        ("{rpn_nms_thresh: '0.7'}", r"model.options.rpn_nms_thresh must be a number in \[0, 1\], got '0.7'"),
        ("{box_head_convs: [256, x]}", r"model.options.box_head_convs must be a list of int, got \[256, 'x'\]"),
        ("{bbox_reg_weights: [10, 10, 5]}", "model.options.bbox_reg_weights must be a list of 4 float"),
        ("{size_divisible: true}", "model.options.size_divisible must be an integer >= 1, got True"),
    ],
)
def test_model_options_are_checked_against_the_builder_signature_naming_the_file(tmp_path, options, message):
    """Issue 21: model.options were an untyped dict (an unknown option failed only when the model was
    built; a wrong type not at all). Now names and types come from the builder's and FasterRCNN's
    signatures, the ranges from one table; the error names the option and the config file."""
    arch = "fasterrcnn_resnet50_c4" if "fpn_channels" in options else "fasterrcnn_resnet50_fpn"
    path = tmp_path / "my.yaml"
    path.write_text(f"model:\n  arch: {arch}\n  options: {options}\n")
    with pytest.raises(ConfigError, match=message) as e:
        load_config(path)
    assert str(e.value).startswith(str(path))


def test_model_options_of_the_builders_are_accepted():
    cfg = load_config(
        overrides=[
            "model.options.min_size=[600, 800]",
            "model.options.anchor_sizes=[16, 32, 64, 128, 256]",
            "model.options.bbox_reg_weights=[10, 10, 5, 5]",
            "model.options.fpn_norm=gn",
            "model.options.box_head_convs=[256, 256]",
            "model.options.image_mean=[0.5, 0.5, 0.5]",
        ]
    )
    assert cfg.model.options["bbox_reg_weights"] == [10, 10, 5, 5]


def test_a_config_written_with_train_alternating_step_still_loads(tmp_path):
    """train.alternating_step left the config (the step's checkpoints record it): an older schedule's
    config.yaml (alternating_step: 0) loads as it was, and an older step's config becomes a plain run."""
    path = tmp_path / "old.yaml"
    path.write_text("train: {schedule: alternating, iterations: 8, alternating_step: 0}\n")
    assert load_config(path).train.schedule == "alternating"
    old_step = {
        "train": {
            "schedule": "alternating",
            "iterations": 3,
            "alternating_iterations": [3, 1, 3, 1],
            "alternating_step": 3,
            "name": "step3",
        }
    }
    assert config_from_dict(old_step).train.schedule == "joint"
