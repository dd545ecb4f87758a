"""The plain-torch reference that the batched and windowed head trainers are checked against.

nn.Module built after torch.manual_seed(seed), batches from torch.randperm with a generator seeded by
seed, CrossEntropyLoss(weight) (balanced class weights when asked), autograd, torch.optim.SGD + StepLR.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.probes import LinearConfig, MLPConfig, balanced_weights


@dataclass
class Reference:
    best: Optional[dict]        # the state dict of the best val epoch (first best on ties); None without val
    best_acc: float
    best_epoch: int
    final: dict                 # the state dict after the last epoch
    history: list = field(default_factory=list)  # per epoch: (train loss, train top-1[, val loss, val top-1])


def fit_reference(build: Callable[[], nn.Module], X, y, Xv, yv, cfg, seed: int, num_classes: int) -> Reference:
    """Train build() on (X, y) with cfg's epochs, batch_size, lr, momentum, weight_decay, step_size, gamma and
    class_weight; train loss and top-1 come from the logits each step used; with (Xv, yv), val after each epoch."""
    torch.manual_seed(seed)
    model = build()
    generator = torch.Generator().manual_seed(seed)
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    weight = balanced_weights(y, num_classes) if cfg.class_weight == "balanced" else None
    criterion = nn.CrossEntropyLoss(weight=weight)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    out = Reference(None, -1.0, 0, {})
    for epoch in range(1, cfg.epochs + 1):
        order, loss_sum, correct = torch.randperm(len(X), generator=generator), 0.0, 0
        for s in range(0, len(X), cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            opt.zero_grad()
            logits = model(X[idx])
            loss = criterion(logits, y[idx])
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
        sched.step()
        entry = (loss_sum / len(X), correct / len(X))
        if Xv is not None:
            Xv_t, yv_t = torch.as_tensor(Xv), torch.as_tensor(yv)
            with torch.no_grad():
                logits = model(Xv_t)
            acc = (logits.argmax(1) == yv_t).float().mean().item()
            entry += (F.cross_entropy(logits, yv_t, weight=weight).item(), acc)
            if acc > out.best_acc:
                out.best_acc, out.best_epoch = acc, epoch
                out.best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out.history.append(entry)
    out.final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


def blobs(n_per_class=20, num_classes=3, n_features=6, spread=0.3, seed=0):
    """Well separated Gaussian blobs: X (n, n_features) float32, y (n,)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (num_classes, n_features))
    y = np.repeat(np.arange(num_classes), n_per_class)
    X = centres[y] + rng.normal(0, spread, (len(y), n_features))
    return X.astype(np.float32), y


def reference_linear_head(X, y, Xv, yv, cfg: LinearConfig, seed: int):
    """The head stage's loop written out with plain torch (tests/reference.py): its best epoch's state, top-1, epoch."""
    num_classes = int(y.max()) + 1
    ref = fit_reference(lambda: nn.Linear(X.shape[1], num_classes), X, y, Xv, yv, cfg, seed, num_classes)
    return ref.best, ref.best_acc, ref.best_epoch


def reference_mlp(X, y, Xv, yv, cfg: MLPConfig, seed: int, num_classes: int):
    """nn.Sequential trained by the plain-torch reference (tests/reference.py): best state, best epoch, history."""
    def build():
        return nn.Sequential(nn.Linear(X.shape[1], cfg.hidden), nn.ReLU(), nn.Dropout(0.0),
                             nn.Linear(cfg.hidden, num_classes))

    ref = fit_reference(build, X, y, Xv, yv, cfg, seed, num_classes)
    return ref.best, ref.best_epoch, ref.history
