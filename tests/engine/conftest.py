"""A short training run shared by the inference tests (predict, explain, evaluate): its last.pt
carries the config and the synthetic data's class names, as a user's checkpoint does."""
import pytest

from fasterrcnn.engine.trainer import train

from .helpers import tiny_config


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """-> (path of last.pt, synthetic dataset folder)."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    cfg = tiny_config(tmp, tmp / "synth", "train.iterations=3")
    result = train(cfg, show_progress=False)
    return result.run_dir / "last.pt", tmp / "synth"
