"""Two CPU processes under torchrun (gloo) end with the weights of one process with the same global
batch: gradients are averaged, the samplers shard the data, per-image sampling is seeded per image,
and BatchNorm is frozen (weights_backbone), so nothing depends on how the batch was split."""

import os
import socket
import subprocess
import sys

import torch
import yaml

from fasterrcnn.engine.checkpoint import load_checkpoint
from fasterrcnn.engine.trainer import train
from fasterrcnn.model.resnet import ResNetBody

from .helpers import tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    backbone = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(ResNetBody(18).state_dict(), backbone)
    common = (
        "train.iterations=3",
        "data.hflip=0.0",
        f"model.weights_backbone={backbone}",
        "solver.warmup_iters=0",
        "solver.lr=0.02",
    )
    single = tiny_config(tmp_path / "one", tmp_path / "synth", *common, "train.batch_size=4")
    result = train(single, show_progress=False)

    double = tiny_config(tmp_path / "two", tmp_path / "synth", *common, "train.batch_size=2")
    config_path = tmp_path / "two.yaml"
    config_path.write_text(yaml.safe_dump(double.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "fasterrcnn",
        "train",
        "--config",
        str(config_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 process(es)" in proc.stderr

    a = load_checkpoint(result.run_dir / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "two" / "runs" / "t" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    start = torch.load(backbone, weights_only=True)
    trained = "layer4.0.conv1.weight"  # trainable (the last 3 stages are), so it must have moved
    assert not torch.allclose(a["backbone.body." + trained], start[trained], rtol=1e-4, atol=1e-6)
