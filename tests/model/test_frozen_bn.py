import torch
from torch import nn

from fasterrcnn.model.frozen_bn import FrozenBatchNorm2d


def test_frozen_bn_matches_batchnorm_in_eval_and_loads_its_state():
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    bn.eval()
    frozen = FrozenBatchNorm2d(5)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped, strict load passes
    x = torch.randn(2, 5, 4, 4)
    assert torch.allclose(frozen(x), bn(x), atol=1e-6)
    assert list(frozen.parameters()) == []
    assert "num_batches_tracked" not in frozen.state_dict()


def test_frozen_bn_eps_zero():
    f = FrozenBatchNorm2d(1, eps=0.0)
    f.running_var.fill_(4.0)
    assert torch.equal(f(torch.full((1, 1, 1, 1), 2.0)), torch.full((1, 1, 1, 1), 1.0))
