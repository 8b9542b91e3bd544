"""A tiny, fast training configuration on a tiny synthetic dataset."""

from fasterrcnn.engine.config import load_config

TINY_MODEL = {
    "min_size": 96,
    "max_size": 128,
    "fpn_channels": 16,
    "representation_size": 32,
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "rpn_pre_nms_top_n_test": 50,
    "rpn_post_nms_top_n_test": 20,
    "rpn_batch_size_per_image": 64,
    "box_batch_size_per_image": 32,
}


def tiny_config(tmp_path, synth_dir, *overrides, **base):
    values = {
        "data": {
            "synth_dir": str(synth_dir),
            "synth_num_train": 12,
            "synth_num_val": 4,
            "synth_size": [96, 128],
            "workers": 0,
        },
        "model": {"arch": "fasterrcnn_resnet18_fpn", "options": dict(TINY_MODEL)},
        "solver": {"lr": 0.01, "warmup_iters": 2},
        "train": {
            "name": "t",
            "out_dir": str(tmp_path / "runs"),
            "iterations": 4,
            "batch_size": 2,
            "log_every": 1,
            "seed": 0,
        },
    }
    for section, entries in base.items():
        values[section].update(entries)
    return load_config(overrides=list(overrides), base=values)
