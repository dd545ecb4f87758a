"""N linear heads trained together as one batched model over the same mini-batches.

The DINOv2 linear-evaluation trick (Oquab et al. 2023): every head sees the same shuffled batches,
so one pass over the features serves the whole grid. Each head has its own lr, weight_decay,
momentum and StepLR (step_size, gamma); they share epochs, batch_size and class_weight (the batches
and the loss). The weights live in one (num_classes * n_heads, n_features + 1) matrix (bias folded in),
class-major: row c * n_heads + h is head h's class c, so each step's softmax over every head's classes
runs across the heads in vector lanes (4.5 against 21 microseconds for 4 rows of 24 heads x 10 classes).
pipeline/lazy_sgd.py's windowed SGD trains it: the cross-entropy output gradients are written out per
step and the update is applied as torch.optim.SGD + StepLR would apply it to an nn.Linear trained alone
with the same seed and batch order, a window of steps at a time (tests/test_joint.py checks weights,
train loss/top-1, best epoch and lr within float tolerance, across window boundaries).

Each head keeps its own best val epoch (first best on ties).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.lazy_sgd import LazyLayer, epoch_windows, full_gram, packed, small_ops, with_ones
from pipeline.probes import (EVAL_BATCH, Array, FitResult, LinearConfig, LinearProbe, ProbeError, as_features,
                             as_labels, check_config, infer_num_classes, loss_weights)
from pipeline.runtime import flushed_subnormals

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


class StepLRs:
    """StepLR.step() for every head: a head's lr (a python float, as StepLR keeps it) times its gamma
    every step_size epochs."""

    def __init__(self, configs: Sequence[LinearConfig]) -> None:
        self.lrs = [float(c.lr) for c in configs]
        self.step_sizes = [c.step_size for c in configs]
        self.gammas = [float(c.gamma) for c in configs]
        self.epoch = 0

    def end_epoch(self) -> None:
        self.epoch += 1
        self.lrs = [lr * g if self.epoch % s == 0 else lr for lr, s, g in zip(self.lrs, self.step_sizes, self.gammas)]


def head_logits(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, H, C) logits of every head: one GEMM against the (H * C, D) stacked weights."""
    n_heads, num_classes, n_features = weight.shape
    return torch.addmm(bias.reshape(-1), x, weight.view(-1, n_features).T).view(len(x), n_heads, num_classes)


@torch.inference_mode()
def evaluate_heads(layer: LazyLayer, x: torch.Tensor, y: torch.Tensor, n_heads: int, num_classes: int,
                   class_weight: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(val top-1 (H,), val loss (H,)) of every head of layer on x (with its ones column), EVAL_BATCH rows at a time."""
    correct = torch.zeros(n_heads, device=x.device)
    nll = torch.zeros(n_heads, device=x.device)
    total = torch.zeros((), device=x.device)
    for s in range(0, len(x), EVAL_BATCH):
        yb = y[s:s + EVAL_BATCH]
        logits = layer.eval_outputs(x, s, s + len(yb)).view(len(yb), num_classes, n_heads)   # class-major
        log_p = torch.log_softmax(logits, dim=1)
        w = torch.ones(len(yb), device=x.device) if class_weight is None else class_weight[yb]
        correct += (logits.max(1).indices == yb[:, None]).float().sum(0)
        nll -= (log_p[torch.arange(len(yb), device=x.device), yb, :] * w[:, None]).sum(0)
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


def initial_weights(n_features: int, num_classes: int, seed: int) -> torch.Tensor:
    """(num_classes, n_features + 1): weight and bias of an nn.Linear drawn with this seed (torch.manual_seed)."""
    torch.manual_seed(seed)
    return packed(nn.Linear(n_features, num_classes))


def _epoch_range(epochs: int, n_heads: int, progress: bool):
    """Epochs 1..epochs, behind a tqdm bar when progress is on."""
    out = range(1, epochs + 1)
    if progress:
        from tqdm import tqdm

        out = tqdm(out, desc=f"{n_heads} linear heads", unit="epoch", leave=False)
    return out


def _by_head(rows: torch.Tensor, n_heads: int, num_classes: int) -> torch.Tensor:
    """The layer's class-major rows (C * H, K) as (H, C, K) (a view)."""
    return rows.view(num_classes, n_heads, -1).transpose(0, 1)


def _by_class(per_head: torch.Tensor) -> torch.Tensor:
    """(H, C, K) as the layer's class-major rows (C * H, K)."""
    return per_head.transpose(0, 1).reshape(-1, per_head.shape[-1])


def _window(layer: LazyLayer, yw: torch.Tensor, sw: torch.Tensor, share: torch.Tensor, n_heads: int,
            num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every step of the window begun on layer; (summed train loss (H,), correct rows (H,)) from the logits used."""
    target = (F.one_hot(yw, num_classes) * -sw).repeat_interleave(n_heads, 1)   # (n, C * H): minus the scaled one-hot
    for k, (s, e) in enumerate(layer.bounds):
        p = torch.softmax(layer.z[s:e].view(e - s, num_classes, n_heads), 1).view(e - s, -1)
        torch.addcmul(target[s:e], p, sw[s:e], out=layer.g[s:e])         # d loss / d logits
        layer.step(k)
    logits = layer.z.view(-1, num_classes, n_heads)                        # what each step used
    top, pred = logits.max(1, keepdim=True)      # the first max, as argmax; argmax(1) is 16x slower on this layout
    # log-sum-exp written out; exp below -87 (a result under float32's smallest normal) takes torch's scalar
    # path, 200x slower, and such terms are under 1e-37 of the top one's 1: clamped, the sum is the same
    lse = (logits - top).clamp_(min=-87.0).exp_().sum(1).log_().add_(top.squeeze(1))
    nll = lse - logits.gather(1, yw.view(-1, 1, 1).expand(-1, 1, n_heads)).squeeze(1)   # (n, H)
    return (nll * share[:, None]).sum(0), (pred.squeeze(1) == yw[:, None]).float().sum(0)


def _train_epoch(layer: LazyLayer, x: torch.Tensor, labels: torch.Tensor, n_heads: int, num_classes: int,
                 batch_size: int, generator: torch.Generator, class_weight: Optional[torch.Tensor],
                 gram: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over the shared shuffled batches, every head updated (lazy_sgd's windows): per head,
    the summed train loss (each batch's mean times its size) and the number of correct rows."""
    total_loss = torch.zeros(n_heads, device=x.device)
    correct = torch.zeros(n_heads, device=x.device)
    for yw, sw, share in epoch_windows(layer, x, labels, batch_size, generator, class_weight, gram):
        with small_ops(x.device):
            loss, right = _window(layer, yw, sw, share, n_heads, num_classes)
        total_loss += loss
        correct += right
    return total_loss, correct


class _BestEpochs:
    """Every head's best val epoch so far (first best on ties), its val top-1 and its layer coordinates
    (LazyLayer.coordinates: (H, C, K), materialised once at the end)."""

    def __init__(self, coords: torch.Tensor) -> None:
        self.coords = coords
        self.acc = torch.full((len(coords),), -1.0, device=coords.device)
        self.epoch = torch.zeros(len(coords), dtype=torch.long, device=coords.device)

    def update(self, epoch: int, acc: torch.Tensor, coords: torch.Tensor) -> None:
        better = acc > self.acc
        self.acc = torch.where(better, acc, self.acc)
        self.epoch = torch.where(better, torch.full_like(self.epoch, epoch), self.epoch)
        self.coords[better] = coords[better]

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


@flushed_subnormals()
def train_linear_heads(X: Array, y: Array, X_val: Optional[Array], y_val: Optional[Array],
                       configs: Sequence[LinearConfig], num_classes: Optional[int] = None, seed: int = 0,
                       device: Union[str, torch.device] = "cpu", progress: bool = False,
                       init: Optional[torch.Tensor] = None) -> JointResult:
    """Train one linear head per config together; each keeps its best val epoch.

    X : (n_samples, n_features); y : (n_samples,); X_val, y_val likewise or None (then the last epoch).
    The configs must agree on epochs, batch_size and class_weight (see shared_key). seed draws the
    batch order; every head starts from init ((num_classes, n_features + 1): weight and bias), by
    default initial_weights(n_features, num_classes, seed).
    """
    t0 = time.perf_counter()
    configs = _check_joint_configs(configs)
    device = torch.device(device)
    x, labels, x_val, labels_val, num_classes = _joint_inputs(X, y, X_val, y_val, num_classes)
    first = configs[0]
    cw = loss_weights(labels, num_classes, first.class_weight)
    cw = cw.to(device) if cw is not None else None
    init = initial_weights(x.shape[1], num_classes, seed) if init is None else init
    weight = init[:, :-1].to(device).expand(len(configs), -1, -1).clone()
    bias = init[:, -1].to(device).expand(len(configs), -1).clone()
    history: list[list[dict]] = [[] for _ in configs]
    x, labels = x.to(device), labels.to(device)
    if x_val is not None:
        x_val, labels_val = with_ones(x_val.to(device)), labels_val.to(device)
    generator = torch.Generator().manual_seed(seed)
    schedule, (n_heads, num_classes) = StepLRs(configs), weight.shape[:2]
    x = with_ones(x)
    gram = full_gram(x, first.epochs, first.batch_size)
    layer = LazyLayer(_by_class(torch.cat([weight, bias[..., None]], 2)), [c.momentum for c in configs],
                      [c.weight_decay for c in configs], [num_classes] * n_heads, interleave=True)
    layer.use_dual(x, gram, first.epochs, x_val)
    best = _BestEpochs(_by_head(layer.coordinates(), n_heads, num_classes).contiguous())
    for epoch in _epoch_range(first.epochs, len(configs), progress):
        lrs = list(schedule.lrs)
        layer.set_lr(lrs, first.batch_size)
        loss, correct = _train_epoch(layer, x, labels, n_heads, num_classes, first.batch_size, generator, cw, gram)
        schedule.end_epoch()
        train_loss, train_acc = (loss / len(x)).tolist(), (correct / len(x)).tolist()
        val = None
        if x_val is not None:
            acc, vloss = evaluate_heads(layer, x_val, labels_val, n_heads, num_classes, cw)
            best.update(epoch, acc, _by_head(layer.coordinates(), n_heads, num_classes))
            val = (acc.tolist(), vloss.tolist())
        _record_epoch(history, epoch, lrs, train_loss, train_acc, val)
    final = layer.weight if x_val is None else layer.materialise(_by_class(best.coords))
    final = _by_head(final, n_heads, num_classes).cpu()
    results = ([FitResult(first.epochs, None, entries) for entries in history] if x_val is None
               else best.results(history))
    return JointResult(list(configs), final[..., :-1].contiguous(), final[..., -1].contiguous(), results,
                       time.perf_counter() - t0)


def fit_linear(model: nn.Linear, x: torch.Tensor, y: torch.Tensor, x_val: Optional[torch.Tensor],
               y_val: Optional[torch.Tensor], cfg: LinearConfig, num_classes: int, seed: int,
               device: torch.device, show_progress: bool = False) -> tuple[dict, FitResult]:
    """fit_module for a LinearProbe's nn.Linear, as one joint head: (the best epoch's state_dict on the CPU,
    FitResult). It starts from model's weights (drawn with the probe's seed) and draws the batches from seed."""
    with torch.no_grad():
        init = packed(model).to(device)
    joint = train_linear_heads(x, y, x_val, y_val, [cfg], num_classes=num_classes, seed=seed, device=device,
                               progress=show_progress, init=init)
    model.to(device)
    return {"weight": joint.weight[0].clone(), "bias": joint.bias[0].clone()}, joint.results[0]


def predict_proba_heads(result: JointResult, X: Array) -> np.ndarray:
    """(n_heads, n_samples, num_classes) class probabilities of every head."""
    x = as_features(X)
    with torch.inference_mode():
        return torch.softmax(head_logits(result.weight, result.bias, x), 2).permute(1, 0, 2).numpy()
