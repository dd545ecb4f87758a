"""torch.optim.SGD + StepLR for the small heads, without torch.optim's import of torch._dynamo.

The first ``torch.optim`` optimizer a process builds imports ``torch._dynamo`` (about 1.5 s here), which
is most of a warm head run. These two classes apply the same update in the same order as
``torch.optim.SGD`` (dampening 0, no Nesterov, not maximising) and ``torch.optim.lr_scheduler.StepLR``;
``tests/test_sgd.py`` shows the trained weights are bitwise equal. Finetuning keeps torch.optim: it
needs the optimizer's state_dict to resume, and imports far more than this anyway.
"""
from __future__ import annotations

from typing import Iterable

import torch


class SGD:
    """One parameter group: p.grad (+ weight_decay * p) -> momentum buffer -> p -= lr * buffer."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        self.param_groups = [{"params": list(params), "lr": lr, "momentum": momentum,
                              "weight_decay": weight_decay}]
        self.buffers: dict[int, torch.Tensor] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            grad = p.grad if weight_decay == 0 else p.grad.add(p, alpha=weight_decay)
            if momentum != 0:
                buf = self.buffers.get(i)
                if buf is None:
                    buf = self.buffers[i] = grad.detach().clone()
                else:
                    buf.mul_(momentum).add_(grad)
                grad = buf
            p.add_(grad, alpha=-lr)


class StepLR:
    """lr *= gamma every step_size calls of step(), as torch's StepLR does (epoch by epoch)."""

    def __init__(self, optimizer: SGD, step_size: int, gamma: float = 0.1) -> None:
        self.optimizer, self.step_size, self.gamma, self.last_epoch = optimizer, step_size, gamma, 0

    def step(self) -> None:
        self.last_epoch += 1
        if self.last_epoch % self.step_size == 0:
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * self.gamma
