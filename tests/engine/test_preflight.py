"""Early, clear failures: each refused before the first training step -- most before any data is
read (the synthetic dataset is not even generated) -- with a message saying what to change."""

import os
import shutil
from collections import namedtuple

import pytest
import torch

from fasterrcnn.cli import main
from fasterrcnn.engine.checkpoint import estimate_checkpoint_bytes
from fasterrcnn.engine.config import ConfigError
from fasterrcnn.engine.trainer import train
from fasterrcnn.model import fasterrcnn_resnet18_fpn, fasterrcnn_resnet34_fpn
from fasterrcnn.model.weights import WeightsError

from .helpers import TINY_MODEL, tiny_config


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synth") / "data"


def _nothing_written(tmp_path):
    run = tmp_path / "runs" / "t"
    return not any((run / n).exists() for n in ("last.pt", "metrics.csv", "config.yaml"))


def test_unwritable_output_folder_is_refused_before_reading_data(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    no_data = tmp_path / "synth"
    cfg = tiny_config(tmp_path, no_data, f"train.out_dir={blocker / 'runs'}")
    with pytest.raises(ConfigError, match=r"cannot write to the run folder .*a_file/runs/t: .*set train.out_dir"):
        train(cfg, show_progress=False)
    assert not no_data.exists()  # refused before the data was generated or read
    # the command line: the message, exit code 2, no traceback
    rc = main(["train", "--config", str(_yaml(tmp_path, cfg))])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write to the run folder" in err and "Traceback" not in err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="cannot write to the run folder"):
            train(tiny_config(tmp_path, tmp_path / "synth", f"train.out_dir={ro}"), show_progress=False)
    finally:
        ro.chmod(0o700)


def _yaml(tmp_path, cfg):
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def test_disk_too_full_for_checkpoints_is_refused_with_the_numbers(tmp_path, synth_dir, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30 - 50 * 2**20, 50 * 2**20))
    cfg = tiny_config(tmp_path, synth_dir)
    with pytest.raises(ConfigError) as e:
        train(cfg, show_progress=False)
    message = str(e.value)
    assert "not enough free disk space in" in message and str((tmp_path / "runs" / "t").resolve()) in message
    assert "a checkpoint of this model and optimizer is about 8" in message  # ~86 MB: 11M weights + momentum
    assert "and 50.0 MB is free" in message and "set train.out_dir" in message
    assert _nothing_written(tmp_path)


def test_checkpoint_size_estimate_is_close_to_the_real_size(tmp_path):
    model = fasterrcnn_resnet18_fpn(num_classes=4, **TINY_MODEL)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the momentum buffers
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "c.pt")
    real = (tmp_path / "c.pt").stat().st_size
    estimate = estimate_checkpoint_bytes(model, optimizer_slots=1)
    assert real <= estimate <= 1.05 * real + 2**21


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize(
    "override, message",
    [
        ("train.device=cuda", r"device 'cuda' asks for CUDA, but no GPU is available here"),
        ("train.amp=fp16", r"train.amp=fp16 needs a CUDA device, and this run is on cpu"),
    ],
)
def test_gpu_settings_without_a_gpu_are_refused_before_reading_data(tmp_path, override, message):
    no_data = tmp_path / "synth"
    with pytest.raises(ConfigError, match=message):
        train(tiny_config(tmp_path, no_data, override), show_progress=False)
    assert not no_data.exists()


def test_no_run_length_and_missing_weights_file_are_refused_before_reading_data(tmp_path):
    no_data = tmp_path / "synth"
    with pytest.raises(ConfigError, match="set train.iterations or train.epochs to a positive number"):
        train(tiny_config(tmp_path, no_data, "train.iterations=0"), show_progress=False)
    with pytest.raises(ConfigError, match=r"model.weights_backbone='.*nope.pth': file not found"):
        train(tiny_config(tmp_path, no_data, f"model.weights_backbone={tmp_path / 'nope.pth'}"), show_progress=False)
    assert not no_data.exists()


def test_weights_of_another_architecture_are_refused_before_training(tmp_path, synth_dir):
    other = tmp_path / "r34.pth"
    torch.save(fasterrcnn_resnet34_fpn(num_classes=4, **TINY_MODEL).state_dict(), other)
    cfg = tiny_config(tmp_path, synth_dir, f"model.weights={other}")  # the config's arch is ResNet-18
    with pytest.raises(WeightsError) as e:
        train(cfg, show_progress=False)
    message = str(e.value)
    assert f"the weights in {other} do not fit this model" in message
    assert "unexpected in the checkpoint" in message and "model.arch is 'fasterrcnn_resnet18_fpn'" in message
    assert _nothing_written(tmp_path)


def test_training_set_smaller_than_a_batch_is_refused(tmp_path, synth_dir):
    with pytest.raises(
        ConfigError,
        match=r"the training set has 12 usable image\(s\), fewer than one batch "
        r"\(train.batch_size=16 x 1 process\(es\)\)",
    ):
        train(tiny_config(tmp_path, synth_dir, "train.batch_size=16"), show_progress=False)
    assert _nothing_written(tmp_path)


def test_an_empty_validation_set_is_refused_before_training():
    from fasterrcnn.engine.preflight import check_dataset_sizes

    check_dataset_sizes(12, 1, 4, 2)  # enough for one batch on each of 2 processes
    with pytest.raises(ConfigError, match="the validation set has no usable image; set data.val"):
        check_dataset_sizes(12, 0, 2, 1)
    with pytest.raises(ConfigError, match=r"fewer than one batch \(train.batch_size=4 x 4 process\(es\)\)"):
        check_dataset_sizes(12, 4, 4, 4)
