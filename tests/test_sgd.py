"""The heads' SGD + StepLR train the same weights as torch.optim's, bit for bit, and import no torch._dynamo."""
import subprocess
import sys

import pytest
import torch
from torch import nn

from pipeline.sgd import SGD, StepLR


def train(make, momentum: float, weight_decay: float, epochs: int = 9) -> tuple[dict, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(40, 12), torch.randint(0, 3, (40,))
    optimizer, scheduler = make(model.parameters(), momentum, weight_decay)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        for start in range(0, 40, 4):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[start:start + 4]), y[start:start + 4]).backward()
            optimizer.step()
        scheduler.step()
    return model.state_dict(), lrs


def torch_sgd(params, momentum, weight_decay):
    opt = torch.optim.SGD(params, lr=0.05, momentum=momentum, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1)


def ours(params, momentum, weight_decay):
    opt = SGD(params, lr=0.05, momentum=momentum, weight_decay=weight_decay)
    return opt, StepLR(opt, step_size=3, gamma=0.1)


@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 0.0), (0.9, 1e-3), (0.0, 0.0), (0.0, 1e-2)])
def test_bitwise_equal_to_torch_optim(momentum, weight_decay):
    expected, expected_lrs = train(torch_sgd, momentum, weight_decay)
    got, lrs = train(ours, momentum, weight_decay)
    assert lrs == expected_lrs
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_imports_no_dynamo():
    code = ("import sys, torch; from torch import nn; from pipeline.sgd import SGD; m = nn.Linear(3, 2); "
            "o = SGD(m.parameters(), 0.1, 0.9); m(torch.randn(4, 3)).sum().backward(); o.step(); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
