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


def train_linear_heads(X: Array, y: Array, X_val: Optional[Array], y_val: Optional[Array],
                       configs: Sequence[LinearConfig], num_classes: Optional[int] = None, seed: int = 0,
                       device: Union[str, torch.device] = "cpu", progress: bool = False) -> JointResult:
    """Train one linear head per config together; each keeps its best val epoch.

    X : (n_samples, n_features); y : (n_samples,); X_val, y_val likewise or None (then the last epoch).
    The configs must agree on epochs, batch_size and class_weight (see shared_key).
    """
    t0 = time.perf_counter()
    configs = [check_config("linear", c) for c in configs]
    if not configs:
        raise ProbeError("train_linear_heads: no head configs given")
    if len({shared_key(c) for c in configs}) > 1:
        raise ProbeError(f"jointly trained linear heads must share {', '.join(SHARED)}; got "
                         f"{sorted({shared_key(c) for c in configs})} (group them with joint.shared_key)")
    device = torch.device(device)
    x = as_features(X)
    labels = as_labels(y, len(x))
    x_val = as_features(X_val, "X_val") if X_val is not None else None
    labels_val = as_labels(y_val, len(x_val), "y_val") if x_val is not None else None
    if x_val is not None and len(x_val) == 0:
        x_val = labels_val = None
    num_classes = num_classes or infer_num_classes(labels, labels_val)
    first = configs[0]
    cw = loss_weights(labels, num_classes, first.class_weight)
    cw = cw.to(device) if cw is not None else None

    torch.manual_seed(seed)   # the same initial weights as a head trained alone with this seed
    init = nn.Linear(x.shape[1], num_classes)
    n = len(configs)
    weight = init.weight.detach().to(device).expand(n, -1, -1).clone()      # (H, C, D)
    bias = init.bias.detach().to(device).expand(n, -1).clone()              # (H, C)
    best_w, best_b = weight.clone(), bias.clone()
    best_acc = torch.full((n,), -1.0, device=device)
    best_epoch = torch.zeros(n, dtype=torch.long, device=device)
    history: list[list[dict]] = [[] for _ in range(n)]
    x, labels = x.to(device), labels.to(device)
    if x_val is not None:
        x_val, labels_val = x_val.to(device), labels_val.to(device)
    generator = torch.Generator().manual_seed(seed)
    sgd = JointSGD(configs, device)
    epochs = range(1, first.epochs + 1)
    if progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc=f"{n} linear heads", unit="epoch", leave=False)
    for epoch in epochs:
        lrs = list(sgd.lrs)
        total_loss = torch.zeros(n, device=device)
        correct = torch.zeros(n, device=device)
        for idx in shuffled_batches(len(x), first.batch_size, generator):
            idx = idx.to(device, non_blocking=True)
            xb, yb = x[idx], labels[idx]
            loss, logits, gw, gb = cross_entropy_grad(weight, bias, xb, yb, cw)
            sgd.step([weight, bias], [gw, gb])
            total_loss += loss * len(yb)
            correct += (logits.argmax(2) == yb[:, None]).float().sum(0)
        sgd.end_epoch()
        train_loss, train_acc = (total_loss / len(x)).tolist(), (correct / len(x)).tolist()
        if x_val is not None:
            acc, vloss = evaluate_heads(weight, bias, x_val, labels_val, cw)
            better = acc > best_acc
            best_acc = torch.where(better, acc, best_acc)
            best_epoch = torch.where(better, torch.full_like(best_epoch, epoch), best_epoch)
            best_w[better], best_b[better] = weight[better], bias[better]
            acc, vloss = acc.tolist(), vloss.tolist()
        for h in range(n):
            entry = {"epoch": epoch, "lr": lrs[h], "train_loss": train_loss[h], "train_acc": train_acc[h]}
            if x_val is not None:
                entry.update(val_loss=vloss[h], val_acc=acc[h])
            history[h].append(entry)
    if x_val is None:
        best_w, best_b = weight, bias
        results = [FitResult(first.epochs, None, history[h]) for h in range(n)]
    else:
        results = [FitResult(int(e), float(a), history[h])
                   for h, (e, a) in enumerate(zip(best_epoch.tolist(), best_acc.tolist()))]
    return JointResult(list(configs), best_w.cpu(), best_b.cpu(), results, time.perf_counter() - t0)


def predict_proba_heads(result: JointResult, X: Array) -> np.ndarray:
    """(n_heads, n_samples, num_classes) class probabilities of every head."""
    x = as_features(X)
    with torch.inference_mode():
        return torch.softmax(head_logits(result.weight, result.bias, x), 2).permute(1, 0, 2).numpy()
