"""train_one_epoch / evaluate, shared by the linear head (on cached features) and finetuning."""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterable, Optional

import numpy as np
import torch
from torch import nn

from pipeline import PipelineError
from pipeline.frozen import AUTOCAST_DTYPES
from pipeline.runtime import progress


class TensorBatches:
    """Mini-batches (x, y) from in-memory tensors, reshuffled every pass by a seeded generator.

    Indexing RAM-resident tensors directly avoids a DataLoader's per-sample overhead, which would
    dominate a linear head's training step.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool,
                 generator: Optional[torch.Generator] = None) -> None:
        if len(x) != len(y):
            raise ValueError(f"{len(x)} feature rows but {len(y)} labels")
        self.x, self.y, self.batch_size, self.shuffle, self.generator = x, y, batch_size, shuffle, generator

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self):
        n = len(self.x)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            if order is None:
                yield self.x[start:start + self.batch_size], self.y[start:start + self.batch_size]
            else:
                idx = order[start:start + self.batch_size]
                yield self.x[idx], self.y[idx]


def compute_loss(outputs, targets: torch.Tensor, criterion: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, main logits); auxiliary classifiers add their weighted loss in training mode.

    Inception v3 returns (logits, aux_logits): loss + 0.4 * aux_loss, as in its paper.
    GoogLeNet returns (logits, aux2, aux1): loss + 0.3 * (aux1 + aux2).
    """
    if isinstance(outputs, torch.Tensor):
        return criterion(outputs, targets), outputs
    logits = outputs[0]
    aux = [a for a in outputs[1:] if a is not None]
    weight = 0.4 if len(aux) == 1 else 0.3
    loss = criterion(logits, targets) + weight * sum(criterion(a, targets) for a in aux)
    return loss, logits


class MixedPrecision:
    """Training steps under torch.autocast (finetune.autocast: none, float16 or bfloat16); float16's
    gradients go through a GradScaler, whose state a resumed run carries on."""

    def __init__(self, mode: str, device: torch.device) -> None:
        self.device_type, self.dtype = device.type, AUTOCAST_DTYPES.get(mode)
        self.scaler = torch.amp.GradScaler(device.type) if mode == "float16" else None
        # steps skipped since take_skipped() last ran, counted on the device
        self._skipped = torch.zeros((), dtype=torch.long, device=device) if self.scaler is not None else None

    def autocast(self):
        """The context a step's forward and loss run in (none: a no-op, not even autocast's own bookkeeping)."""
        return contextlib.nullcontext() if self.dtype is None else torch.autocast(self.device_type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """backward and the optimizer's step (skipped by the scaler when float16's gradients overflowed)."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()     # scale() creates the scale tensor on the first step
        # The scale compared on the device (get_scale() would wait for the step every step): update() lowers it
        # exactly when step() skipped the optimizer because a gradient overflowed.
        before = self.scaler._get_scale_async().clone()
        self.scaler.step(optimizer)
        self.scaler.update()
        self._skipped += self.scaler._get_scale_async() < before

    def skipped_note(self, epoch: dict) -> str:
        """'; float16's gradient scaler skipped k of n steps ...' for a train_one_epoch result with k > 0, else ''."""
        if not epoch.get("skipped"):
            return ""
        return (f"; float16's gradient scaler skipped {epoch['skipped']} of {epoch['steps']} steps, whose gradients "
                f"overflowed (it lowered its scale to {self.scaler.get_scale():g})")

    def take_skipped(self) -> int:
        """How many steps the scaler skipped since the last call (0 without a scaler); waits for the device."""
        if self._skipped is None:
            return 0
        skipped = int(self._skipped.item())
        self._skipped.zero_()
        return skipped


FULL_PRECISION = MixedPrecision("none", torch.device("cpu"))


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    batches: Iterable, device: torch.device, desc: Optional[str] = None,
                    precision: MixedPrecision = FULL_PRECISION) -> dict:
    """One pass of SGD over batches; returns mean loss and accuracy on what it trained on, how many samples
    and steps, and how many of the steps float16's gradient scaler skipped."""
    model.train()
    # Running sums stay on the device: a .item() per step would wait for the GPU every step.
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = steps = 0
    bar = progress(batches, desc=desc, unit="batch", leave=False) if desc else batches
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            loss, logits = compute_loss(model(x), y, criterion)
        precision.step(loss, optimizer)
        with torch.no_grad():
            total_loss += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        steps += 1
    return {"loss": total_loss.item() / max(seen, 1), "acc": correct.item() / max(seen, 1), "samples": seen,
            "steps": steps, "skipped": precision.take_skipped()}


@torch.inference_mode()
def predict(model: nn.Module, batches: Iterable, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, C), targets (N,)) on CPU for every batch, model in eval mode."""
    model.eval()
    logits, targets = [], []
    for x, y in batches:
        logits.append(model(x.to(device, non_blocking=True)).float().cpu())
        targets.append(torch.as_tensor(y))
    return torch.cat(logits), torch.cat(targets)


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy as correct / total in float64: the same number numpy gives for the same predictions
    (a float32 mean would differ from it in the last bits)."""
    return int((logits.argmax(1) == targets).sum().item()) / max(len(targets), 1)


def score(logits: torch.Tensor, targets: torch.Tensor, criterion: nn.Module) -> dict:
    """Mean loss and top-1 accuracy of logits (N, C) against targets (N,)."""
    return {"loss": criterion(logits, targets).item(), "acc": _accuracy(logits, targets)}


def evaluate(model: nn.Module, criterion: nn.Module, batches: Iterable, device: torch.device) -> dict:
    """Mean loss and top-1 accuracy over batches."""
    return score(*predict(model, batches, device), criterion)


def check_finite_loss(stage: str, loss: float, epoch: int, lr_key: str) -> None:
    """A diverged run stops with a line instead of saving a model that predicts p=1.000 for everything."""
    if not math.isfinite(loss):
        raise PipelineError(f"{stage}: the training loss diverged ({loss}) in epoch {epoch}: lower {lr_key} "
                            "(the previous model is unchanged)")


def step_schedule(scheduler) -> None:
    """scheduler.step() at an epoch's end, without torch's warning that it ran before optimizer.step(): in an
    epoch whose steps float16's gradient scaler all skipped, the epoch line says so instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        scheduler.step()


def make_sgd(params, lr: float, momentum: float, weight_decay: float, step_size: int, gamma: float,
             light: bool = False):
    """SGD with momentum and a StepLR schedule, as in the PyTorch transfer-learning tutorial.

    light: pipeline.sgd's bitwise-equal pair instead of torch.optim's (one parameter group, no
    state_dict), which spares a small head the 1.5 s import of torch._dynamo.
    """
    if light:
        from pipeline.sgd import SGD, StepLR

        optimizer = SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        return optimizer, StepLR(optimizer, step_size=step_size, gamma=gamma)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)


def to_tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
    """A cached split's (n_samples, feature_dim) float32 features and (n_samples,) int64 labels as tensors."""
    return torch.from_numpy(np.ascontiguousarray(split.features, dtype=np.float32)), torch.from_numpy(split.labels)
