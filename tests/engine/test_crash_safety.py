"""Nothing lost: a run killed at any point (SIGKILL mid-step, SIGKILL half-way through writing a
checkpoint, SIGTERM) and resumed from its last.pt ends with bit-identical weights to a run that was
never interrupted -- with DataLoader workers too -- and its metrics.csv has no duplicates; Ctrl-C
stops cleanly; a full disk or a file gone bad costs at most the steps since the last checkpoint.

The runs are tiny (8 training images of 96x128, batch 2, 6 iterations, so the run crosses an epoch
boundary and resumes in the middle of an epoch) and single-threaded, so that two processes compute
exactly the same floats.
"""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fasterrcnn.cli import main
from fasterrcnn.engine.checkpoint import load_checkpoint
from fasterrcnn.engine.metrics import MetricsLog, read_metrics
from fasterrcnn.engine.trainer import train
from fasterrcnn.files import stale_temps

from .helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]
CRASH_RUN = Path(__file__).with_name("crash_run.py")
# bit-identical resumes are a CPU property (CUDA kernels with atomics are not deterministic)
RUN = (
    "train.iterations=6",
    "train.checkpoint_every=2",
    "train.threads=1",
    "train.device=cpu",
    "data.hflip=0.5",
    "data.synth_num_train=8",
)


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synth") / "data"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synth_dir):
    """The uninterrupted run (data.workers=0): its final weights and its metrics rows."""
    threads = torch.get_num_threads()
    try:
        result = train(tiny_config(tmp_path_factory.mktemp("ref"), synth_dir, *RUN), show_progress=False)
    finally:
        torch.set_num_threads(threads)
    return load_checkpoint(result.run_dir / "last.pt"), read_metrics(result.run_dir / "metrics.csv")


def _write_config(tmp_path, synth_dir, *overrides) -> Path:
    cfg = tiny_config(tmp_path, synth_dir, *RUN, *overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _crash(mode: str, n: int, *train_args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CRASH_RUN), mode, str(n), *map(str, train_args)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _assert_same_weights(state, reference_state):
    a, b = state["model"], reference_state["model"]
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert state["iteration"] == reference_state["iteration"]


def _rows(rows):
    return [(r["kind"], int(r["iteration"]), r["loss"], r["AP"]) for r in rows]


def test_killed_three_times_and_resumed_gives_bit_identical_weights(tmp_path, synth_dir, reference):
    """One run, interrupted three ways in a row, each time resumed from its last.pt with a different
    number of DataLoader workers (the reference used none):
      1. SIGKILL half-way through writing last.pt of step 4 (workers=1): last.pt of step 2 stays whole
      2. SIGTERM during step 3 (workers=2): the step is finished and saved, exit 143
      3. SIGKILL in the middle of step 5 (workers=0): last.pt of step 4 (checkpoint_every=2)
    and finished in this process: every weight equal to the uninterrupted run's, every metrics row
    (losses, AP) written once and equal to its."""
    config = _write_config(tmp_path, synth_dir, "data.workers=1")
    run = tmp_path / "runs" / "t"
    last = run / "last.pt"

    proc = _crash("kill-in-save", 2, "--config", config)  # the 2nd checkpoint write: last.pt of step 4
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert load_checkpoint(last)["iteration"] == 2  # whole, though the process died while replacing it
    assert stale_temps(run), "the half-written temporary file should be there"

    proc = _crash("signal-at-iter", 3, "--resume", last, "data.workers=2")
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert f"continue with: fasterrcnn train --resume {last}" in proc.stderr and "Traceback" not in proc.stderr
    assert load_checkpoint(last)["iteration"] == 3  # the step in progress was finished and saved
    assert not stale_temps(run)  # the resume cleared what the kill had left

    proc = _crash("kill-at-iter", 5, "--resume", last, "data.workers=0")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert load_checkpoint(last)["iteration"] == 4

    result = train(None, resume=str(last), resume_overrides=["data.workers=1"], show_progress=False)
    assert result.iterations == 6
    _assert_same_weights(load_checkpoint(last), reference[0])
    assert _rows(read_metrics(run / "metrics.csv")) == _rows(reference[1])  # each row once, the same numbers


def test_ctrl_c_to_the_process_group_stops_cleanly_with_workers(tmp_path, synth_dir):
    """SIGINT to the whole group, as a terminal sends it: the DataLoader worker ignores it, the main
    process finishes its step, saves last.pt, says how to resume and exits with 130."""
    config = _write_config(tmp_path, synth_dir, "data.workers=1", "train.iterations=500", "train.checkpoint_every=0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fasterrcnn", "train", "--config", str(config)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    metrics = tmp_path / "runs" / "t" / "metrics.csv"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (metrics.exists() and len(read_metrics(metrics)) >= 1):
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    last = tmp_path / "runs" / "t" / "last.pt"
    assert proc.returncode == 130, err[-3000:]
    assert f"fasterrcnn train --resume {last}" in err and "SIGINT" in err
    assert "Traceback" not in err and "DataLoader worker" not in err
    state = load_checkpoint(last)
    assert 1 <= state["iteration"] < 500
    assert max(int(r["iteration"]) for r in read_metrics(metrics)) == state["iteration"]


def test_resume_drops_metrics_rows_after_the_checkpoint_and_a_cut_last_line(tmp_path):
    """(The end-to-end runs above check the same through real kills: every iteration logged once.)"""
    path = tmp_path / "metrics.csv"
    log = MetricsLog(path)
    for i in (1, 2, 3):
        log.write({"kind": "train", "iteration": i, "epoch": 0, "loss": 1.0 / i})
    log.write({"kind": "eval", "iteration": 3, "epoch": 0, "AP": 0.5})
    with open(path, "a", newline="") as f:
        f.write("train,4,0,0.01,2.5")  # a row cut short by a kill
    assert [(r["kind"], int(r["iteration"])) for r in read_metrics(path)] == [
        ("train", 1),
        ("train", 2),
        ("train", 3),
        ("eval", 3),
    ]

    MetricsLog(path, resume_iteration=2)  # the checkpoint is of iteration 2: 3 and the eval at 3 are redone
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["kind"], int(r["iteration"]), r["loss"]) for r in rows] == [("train", 1, "1"), ("train", 2, "0.5")]
    assert not stale_temps(tmp_path)


def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, synth_dir, monkeypatch, capsys):
    """The write of last.pt at step 2 hits a full disk (/dev/full: a real ENOSPC from torch.save's
    writes): last.pt of step 1 stays whole, no temporary file is left, and the error says the disk
    is full and names the folder."""
    import fasterrcnn.files as files

    real_open_temp = files._open_temp
    calls = []

    def open_temp(path, mode, **kwargs):
        calls.append(path.name)
        if path.name == "last.pt" and calls.count("last.pt") == 2:
            tmp = path.parent / f".{path.name}.full{files.TEMP_SUFFIX}"
            os.symlink("/dev/full", tmp)
            return open(tmp, mode, **kwargs), str(tmp)
        return real_open_temp(path, mode, **kwargs)

    monkeypatch.setattr(files, "_open_temp", open_temp)
    config = _write_config(tmp_path, synth_dir, "train.iterations=3", "train.checkpoint_every=1")
    rc = main(["train", "--config", str(config)])
    err = capsys.readouterr().err
    run = (tmp_path / "runs" / "t").resolve()
    assert rc == 2
    assert "the disk is full" in err and str(run) in err and "the previous last.pt is unchanged" in err
    assert load_checkpoint(run / "last.pt")["iteration"] == 1
    assert not stale_temps(run) and not any(p.is_symlink() for p in run.iterdir())


def test_an_image_that_breaks_mid_run_names_the_file_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys, caplog):
    """The images go bad after the checkpoint of step 1: the run stops at step 2 with an error naming
    the file, last.pt of step 1 is whole, and the log says how to continue once the file is fixed."""
    import logging

    import fasterrcnn.engine.checkpoint as checkpoint

    synth = tmp_path / "synth"
    real_save = checkpoint.save_checkpoint

    def save_then_break_the_images(path, state):
        real_save(path, state)
        for image in (synth / "train").glob("*.jpg"):
            image.write_bytes(b"not a jpeg any more")

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_break_the_images)
    config = _write_config(tmp_path, synth, "train.iterations=3", "train.checkpoint_every=1")
    with caplog.at_level(logging.INFO, logger="fasterrcnn"):
        rc = main(["train", "--config", str(config)])
    err = capsys.readouterr().err
    last = tmp_path / "runs" / "t" / "last.pt"
    error = err.strip().splitlines()[-1]
    assert rc == 2 and error.startswith("error: ") and ".jpg" in error and "instances_train.json" in error
    assert load_checkpoint(last)["iteration"] == 1
    assert f"training failed at iteration 1; {last} is whole" in caplog.text
    assert f"fasterrcnn train --resume {last}" in caplog.text
