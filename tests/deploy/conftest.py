import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """load_exported(..., backend="torch", threads=N) and Detector.load(..., threads=N) set torch's process-wide
    thread count; without this, a test asking for one thread would leave every later test of the session on one."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
