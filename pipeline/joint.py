"""N linear heads trained together as one batched model over the same mini-batches.

The DINOv2 linear-evaluation trick (Oquab et al. 2023): every head sees the same shuffled batches,
so one pass over the features serves the whole grid. Each head has its own lr, weight_decay,
momentum and StepLR (step_size, gamma); they share epochs, batch_size and class_weight (the batches
and the loss). The weights live in one (n_heads, num_classes, n_features) tensor; the cross-entropy
gradient and the SGD update are written out per head, batched, so that head h follows exactly the
update torch.optim.SGD + StepLR would apply to an nn.Linear trained alone with the same seed and
batch order (the test checks this within float tolerance).

Each head keeps its own best val epoch (first best on ties).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from pipeline.probes import (EVAL_BATCH, Array, FitResult, LinearConfig, LinearProbe, ProbeError, as_features,
                             as_labels, check_config, infer_num_classes, loss_weights, shuffled_batches)

SHARED = ("epochs", "batch_size", "class_weight")   # what the heads of one joint run must agree on


def shared_key(cfg: LinearConfig) -> tuple:
    """Configs with equal keys can be trained in one joint run."""
    return tuple(getattr(cfg, name) for name in SHARED)


@dataclass
class JointResult:
    configs: list[LinearConfig]
    weight: torch.Tensor                 # (n_heads, num_classes, n_features): each head's best epoch, CPU
    bias: torch.Tensor                   # (n_heads, num_classes)
    results: list[FitResult]             # per head: best epoch, best val top-1, history
    seconds: float = 0.0                 # wall time of the whole joint run

    def probe(self, h: int, seed: int = 0, device: Union[str, torch.device] = "cpu") -> LinearProbe:
        """Head h as a fitted LinearProbe (what the head stage would have saved)."""
        num_classes, n_features = self.weight.shape[1:]
        probe = LinearProbe(self.configs[h], num_classes=num_classes, seed=seed, device=device)
        probe.n_features = n_features
        probe._load_tensors({"weight": self.weight[h].clone(), "bias": self.bias[h].clone()})
        probe.result = self.results[h]
        return probe


class JointSGD:
    """torch.optim.SGD (dampening 0, no Nesterov) + StepLR, vectorised over heads with per-head hyper-parameters."""

    def __init__(self, configs: Sequence[LinearConfig], device: torch.device) -> None:
        def column(name):
            return torch.tensor([float(getattr(c, name)) for c in configs], device=device)

        self.lrs = [float(c.lr) for c in configs]          # python floats, as StepLR keeps them
        self.step_sizes = [c.step_size for c in configs]
        self.gammas = [float(c.gamma) for c in configs]
        self.momentum, self.weight_decay = column("momentum"), column("weight_decay")
        self.device, self.epoch, self.buffers = device, 0, None
        self.decay = any(c.weight_decay for c in configs)
        self._neg_lr = -torch.tensor(self.lrs, device=device)

    def step(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """buf = (grad + weight_decay * p) + momentum * buf; p -= lr * buf; head dimension first.

        In place, one pass per line (the updates are memory-bound: every head's weights each step);
        grads are consumed.
        """
        if self.buffers is None:
            self.buffers = [torch.zeros_like(p) for p in params]
        for p, g, buf in zip(params, grads, self.buffers):
            shape = (-1,) + (1,) * (p.ndim - 1)
            if self.decay:
                g.addcmul_(self.weight_decay.view(shape), p)
            torch.addcmul(g, buf, self.momentum.view(shape), out=buf)
            p.addcmul_(self._neg_lr.view(shape), buf)

    def end_epoch(self) -> None:
        """StepLR.step(): multiply a head's lr by its gamma every step_size epochs."""
        self.epoch += 1
        self.lrs = [lr * g if self.epoch % s == 0 else lr for lr, s, g in zip(self.lrs, self.step_sizes, self.gammas)]
        self._neg_lr = -torch.tensor(self.lrs, device=self.device)


def head_logits(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, H, C) logits of every head: one GEMM against the (H * C, D) stacked weights."""
    n_heads, num_classes, n_features = weight.shape
    return torch.addmm(bias.reshape(-1), x, weight.view(-1, n_features).T).view(len(x), n_heads, num_classes)


def cross_entropy_grad(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                       class_weight: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head mean cross-entropy of a batch and its gradients, as nn.CrossEntropyLoss(weight) computes them.

    weight (H, C, D), bias (H, C), x (B, D), y (B,) -> (loss (H,), logits (B, H, C), grad_weight, grad_bias)
    """
    logits = head_logits(weight, bias, x)                                     # (B, H, C)
    log_p = torch.log_softmax(logits, dim=2)
    rows = torch.arange(len(y), device=x.device)
    w = torch.ones(len(y), device=x.device) if class_weight is None else class_weight[y]   # (B,)
    scale = w / w.sum()
    loss = -(log_p[rows, :, y] * scale[:, None]).sum(0)                       # (H,)
    g = log_p.exp_()
    g[rows, :, y] -= 1
    g *= scale[:, None, None]                                                 # d loss / d logits
    grad_weight = (g.view(len(y), -1).T @ x).view(weight.shape)               # (H, C, D)
    return loss, logits, grad_weight, g.sum(0)


@torch.inference_mode()
def evaluate_heads(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                   class_weight: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(val top-1 (H,), val loss (H,)) of every head, EVAL_BATCH rows at a time."""
    correct = torch.zeros(len(weight), device=x.device)
    nll = torch.zeros(len(weight), device=x.device)
    total = torch.zeros((), device=x.device)
    for s in range(0, len(x), EVAL_BATCH):
        xb, yb = x[s:s + EVAL_BATCH], y[s:s + EVAL_BATCH]
        logits = head_logits(weight, bias, xb)                                # (b, H, C)
        log_p = torch.log_softmax(logits, dim=2)
        w = torch.ones(len(yb), device=x.device) if class_weight is None else class_weight[yb]
        correct += (logits.argmax(2) == yb[:, None]).float().sum(0)
        nll -= (log_p[torch.arange(len(yb), device=x.device), :, yb] * w[:, None]).sum(0)
        total += w.sum()
    return correct / len(x), nll / total


def _check_joint_configs(configs: Sequence[LinearConfig]) -> list[LinearConfig]:
    """The checked configs; ProbeError when there are none or they do not share epochs, batch_size, class_weight."""
    configs = [check_config("linear", c) for c in configs]
    if not configs:
        raise ProbeError("train_linear_heads: no head configs given")
    if len({shared_key(c) for c in configs}) > 1:
        raise ProbeError(f"jointly trained linear heads must share {', '.join(SHARED)}; got "
                         f"{sorted({shared_key(c) for c in configs})} (group them with joint.shared_key)")
    return configs


def _joint_inputs(X: Array, y: Array, X_val: Optional[Array], y_val: Optional[Array],
                  num_classes: Optional[int]) -> tuple:
    """(x, labels, x_val, labels_val, num_classes) as checked CPU tensors; an empty val counts as none."""
    x = as_features(X)
    labels = as_labels(y, len(x))
    x_val = as_features(X_val, "X_val") if X_val is not None else None
    labels_val = as_labels(y_val, len(x_val), "y_val") if x_val is not None else None
    if x_val is not None and len(x_val) == 0:
        x_val = labels_val = None
    return x, labels, x_val, labels_val, num_classes or infer_num_classes(labels, labels_val)


def _initial_heads(n_heads: int, n_features: int, num_classes: int, seed: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (H, C, D), bias (H, C)): every head starts as an nn.Linear drawn alone with this seed."""
    torch.manual_seed(seed)
    init = nn.Linear(n_features, num_classes)
    weight = init.weight.detach().to(device).expand(n_heads, -1, -1).clone()
    bias = init.bias.detach().to(device).expand(n_heads, -1).clone()
    return weight, bias


def _epoch_range(epochs: int, n_heads: int, progress: bool):
    """Epochs 1..epochs, behind a tqdm bar when progress is on."""
    out = range(1, epochs + 1)
    if progress:
        from tqdm import tqdm

        out = tqdm(out, desc=f"{n_heads} linear heads", unit="epoch", leave=False)
    return out


def _train_epoch(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, labels: torch.Tensor,
                 batch_size: int, generator: torch.Generator, class_weight: Optional[torch.Tensor],
                 sgd: JointSGD) -> tuple[list[float], list[float]]:
    """One pass over the shared shuffled batches, every head updated in place: per head, train loss and top-1."""
    total_loss = torch.zeros(len(weight), device=x.device)
    correct = torch.zeros(len(weight), device=x.device)
    for idx in shuffled_batches(len(x), batch_size, generator):
        idx = idx.to(x.device, non_blocking=True)
        xb, yb = x[idx], labels[idx]
        loss, logits, gw, gb = cross_entropy_grad(weight, bias, xb, yb, class_weight)
        sgd.step([weight, bias], [gw, gb])
        total_loss += loss * len(yb)
        correct += (logits.argmax(2) == yb[:, None]).float().sum(0)
    sgd.end_epoch()
    return (total_loss / len(x)).tolist(), (correct / len(x)).tolist()


class _BestEpochs:
    """Every head's best val epoch so far (first best on ties), its val top-1 and its weights."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight, self.bias = weight.clone(), bias.clone()
        self.acc = torch.full((len(weight),), -1.0, device=weight.device)
        self.epoch = torch.zeros(len(weight), dtype=torch.long, device=weight.device)

    def update(self, epoch: int, acc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
        better = acc > self.acc
        self.acc = torch.where(better, acc, self.acc)
        self.epoch = torch.where(better, torch.full_like(self.epoch, epoch), self.epoch)
        self.weight[better], self.bias[better] = weight[better], bias[better]

    def results(self, history: list[list[dict]]) -> list[FitResult]:
        return [FitResult(int(e), float(a), history[h])
                for h, (e, a) in enumerate(zip(self.epoch.tolist(), self.acc.tolist()))]


def _record_epoch(history: list[list[dict]], epoch: int, lrs: list[float], train_loss: list[float],
                  train_acc: list[float], val: Optional[tuple[list[float], list[float]]]) -> None:
    """Append each head's history entry: lr, train loss/acc and, with val = (top-1, loss), val loss/acc."""
    for h, entries in enumerate(history):
        entry = {"epoch": epoch, "lr": lrs[h], "train_loss": train_loss[h], "train_acc": train_acc[h]}
        if val is not None:
            entry.update(val_loss=val[1][h], val_acc=val[0][h])
        entries.append(entry)


def train_linear_heads(X: Array, y: Array, X_val: Optional[Array], y_val: Optional[Array],
                       configs: Sequence[LinearConfig], num_classes: Optional[int] = None, seed: int = 0,
                       device: Union[str, torch.device] = "cpu", progress: bool = False,
                       init_seed: Optional[int] = None) -> JointResult:
    """Train one linear head per config together; each keeps its best val epoch.

    X : (n_samples, n_features); y : (n_samples,); X_val, y_val likewise or None (then the last epoch).
    The configs must agree on epochs, batch_size and class_weight (see shared_key). seed draws the
    batch order and, unless init_seed is given, the initial weights.
    """
    t0 = time.perf_counter()
    configs = _check_joint_configs(configs)
    device = torch.device(device)
    x, labels, x_val, labels_val, num_classes = _joint_inputs(X, y, X_val, y_val, num_classes)
    first = configs[0]
    cw = loss_weights(labels, num_classes, first.class_weight)
    cw = cw.to(device) if cw is not None else None
    weight, bias = _initial_heads(len(configs), x.shape[1], num_classes, seed if init_seed is None else init_seed,
                                  device)
    best = _BestEpochs(weight, bias)
    history: list[list[dict]] = [[] for _ in configs]
    x, labels = x.to(device), labels.to(device)
    if x_val is not None:
        x_val, labels_val = x_val.to(device), labels_val.to(device)
    generator = torch.Generator().manual_seed(seed)
    sgd = JointSGD(configs, device)
    for epoch in _epoch_range(first.epochs, len(configs), progress):
        lrs = list(sgd.lrs)
        train_loss, train_acc = _train_epoch(weight, bias, x, labels, first.batch_size, generator, cw, sgd)
        val = None
        if x_val is not None:
            acc, vloss = evaluate_heads(weight, bias, x_val, labels_val, cw)
            best.update(epoch, acc, weight, bias)
            val = (acc.tolist(), vloss.tolist())
        _record_epoch(history, epoch, lrs, train_loss, train_acc, val)
    if x_val is None:
        results = [FitResult(first.epochs, None, entries) for entries in history]
        return JointResult(list(configs), weight.cpu(), bias.cpu(), results, time.perf_counter() - t0)
    return JointResult(list(configs), best.weight.cpu(), best.bias.cpu(), best.results(history),
                       time.perf_counter() - t0)


def predict_proba_heads(result: JointResult, X: Array) -> np.ndarray:
    """(n_heads, n_samples, num_classes) class probabilities of every head."""
    x = as_features(X)
    with torch.inference_mode():
        return torch.softmax(head_logits(result.weight, result.bias, x), 2).permute(1, 0, 2).numpy()
