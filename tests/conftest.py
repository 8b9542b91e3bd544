import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A short training run shared by the inference tests (predict, explain, evaluate): its last.pt
    carries the config and the synthetic data's class names, as a user's checkpoint does.
    -> (path of last.pt, synthetic dataset folder)."""
    from fasterrcnn.engine.trainer import train

    from .engine.helpers import tiny_config

    tmp = tmp_path_factory.mktemp("tiny_run")
    cfg = tiny_config(tmp, tmp / "synth", "train.iterations=3")
    result = train(cfg, show_progress=False)
    return result.run_dir / "last.pt", tmp / "synth"
