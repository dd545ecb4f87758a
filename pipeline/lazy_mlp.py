"""The mlp probe's training loop with its hidden layer on pipeline/lazy_sgd.py's windowed exact SGD.

An MLP (Linear -> ReLU -> Dropout(0) -> Linear) trained by SGD + momentum + StepLR with batch_size 4
spends most of each step passing over the first layer's (hidden, n_features) weights, its gradient and
its momentum buffer, although the step's gradient has rank 4. Here the first layer (bias folded in) is
a LazyLayer: each step reads its pre-activations from the window's projections and adds its rank-B
update to them; the small second layer (num_classes, hidden + 1) is updated directly every step, in the
order pipeline.sgd.SGD applies it. The result is fit_module's (the same initial weights, batch order,
loss, history and first-best val epoch) within float tolerance (tests/test_probes.py checks it against
torch.optim). Dropout > 0 draws random masks per step and stays on fit_module.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.lazy_sgd import LazyLayer, epoch_windows, full_gram, small_ops, with_ones

if TYPE_CHECKING:
    from pipeline.probes import FitResult, MLPConfig


class _OutputLayer:
    """The second layer W2 (C, hidden + 1) and its momentum buffer: pipeline.sgd.SGD's update, in place."""

    def __init__(self, weight: torch.Tensor, momentum: float, weight_decay: float) -> None:
        self.weight, self.momentum, self.weight_decay = weight, momentum, weight_decay
        self.buf = torch.zeros_like(weight) if momentum else None
        self.lr = 0.0

    def step(self, grad: torch.Tensor) -> None:
        if self.weight_decay:
            grad.add_(self.weight, alpha=self.weight_decay)
        if self.buf is not None:
            torch.add(grad, self.buf, alpha=self.momentum, out=self.buf)     # buf = momentum * buf + grad
            grad = self.buf
        self.weight.add_(grad, alpha=-self.lr)


def _mlp_window(first: LazyLayer, out: _OutputLayer, yw: torch.Tensor, sw: torch.Tensor,
                num_classes: int) -> torch.Tensor:
    """Every step of the window begun on first: (n, C) the logits each step used."""
    n, hidden = first.z.shape
    h = torch.ones(n, hidden + 1, device=first.z.device)                 # the ReLU outputs and a constant 1
    logits = torch.empty(n, num_classes, device=first.z.device)
    target = F.one_hot(yw, num_classes) * -sw                            # minus the scaled one-hot
    for k, (s, e) in enumerate(first.bounds):
        z = first.z[s:e]
        torch.clamp(z, min=0, out=h[s:e, :hidden])
        torch.mm(h[s:e], out.weight.T, out=logits[s:e])
        p = torch.softmax(logits[s:e], 1)
        g2 = torch.addcmul(target[s:e], p, sw[s:e])                     # d loss / d logits
        torch.mul(g2 @ out.weight[:, :hidden], z > 0, out=first.g[s:e])  # back through the ReLU, before the update
        out.step(g2.T @ h[s:e])
        first.step(k)
    return logits


def _mlp_epoch(first: LazyLayer, out: _OutputLayer, x: torch.Tensor, labels: torch.Tensor, num_classes: int,
               batch_size: int, generator: torch.Generator, class_weight: Optional[torch.Tensor],
               gram: Optional[torch.Tensor]) -> tuple[float, float]:
    """One shuffled pass: (mean train loss, train top-1), as train_one_epoch reports them."""
    total_loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    for yw, sw, share in epoch_windows(first, x, labels, batch_size, generator, class_weight, gram):
        with small_ops(x.device):
            logits = _mlp_window(first, out, yw, sw, num_classes)
        nll = torch.logsumexp(logits, 1) - logits.gather(1, yw[:, None]).squeeze(1)
        total_loss += (nll * share).sum()
        correct += (logits.argmax(1) == yw).sum()
    n = max(len(x), 1)
    return total_loss.item() / n, correct.item() / n


def _state(first: LazyLayer, out: _OutputLayer) -> dict:
    """The nn.Sequential state dict (on the CPU) of the current weights."""
    w1, w2 = first.weight.cpu(), out.weight.detach().cpu()
    return {"0.weight": w1[:, :-1].clone(), "0.bias": w1[:, -1].clone(),
            "3.weight": w2[:, :-1].clone(), "3.bias": w2[:, -1].clone()}


@torch.inference_mode()
def _val_logits(first: LazyLayer, out: _OutputLayer, x_val: torch.Tensor, eval_batch: int) -> torch.Tensor:
    """(n_val, C) logits on the CPU, eval_batch rows at a time."""
    w1, w2 = first.weight, out.weight
    parts = [torch.addmm(w2[:, -1], torch.relu(torch.addmm(w1[:, -1], xb, w1[:, :-1].T)), w2[:, :-1].T).cpu()
             for xb in x_val.split(eval_batch)]
    return torch.cat(parts)


def fit_mlp_lazy(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, x_val: Optional[torch.Tensor],
                 y_val: Optional[torch.Tensor], cfg: "MLPConfig", num_classes: int, seed: int, device: torch.device,
                 show_progress: bool = False) -> tuple[dict, "FitResult"]:
    """fit_module for an MLPProbe's model with dropout 0: (the best epoch's state_dict on the CPU, FitResult)."""
    from pipeline.probes import EVAL_BATCH, FitResult, loss_weights

    generator = torch.Generator().manual_seed(seed)
    lin1, lin2 = model.to(device)[0], model[3]          # on the device, as fit_module leaves it (predict_proba)
    x, y = with_ones(x.to(device)), y.to(device)
    x_val = x_val.to(device) if x_val is not None else None
    weight = loss_weights(y.cpu(), num_classes, cfg.class_weight)
    cw = weight.to(device) if weight is not None else None
    with torch.no_grad():
        first = LazyLayer(torch.cat([lin1.weight, lin1.bias[:, None]], 1).to(device), [cfg.momentum],
                          [cfg.weight_decay], [lin1.out_features])
        out = _OutputLayer(torch.cat([lin2.weight, lin2.bias[:, None]], 1).to(device), cfg.momentum,
                           cfg.weight_decay)
    gram, lr = full_gram(x, cfg.epochs, cfg.batch_size), float(cfg.lr)
    result, best_state = FitResult(0, None), None
    epochs = range(1, cfg.epochs + 1)
    if show_progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc="MLP", unit="epoch", leave=False)
    for epoch in epochs:
        first.set_lr([lr], cfg.batch_size)
        out.lr = lr
        loss, acc = _mlp_epoch(first, out, x, y, num_classes, cfg.batch_size, generator, cw, gram)
        entry = {"epoch": epoch, "lr": lr, "train_loss": loss, "train_acc": acc}
        lr = lr * cfg.gamma if epoch % cfg.step_size == 0 else lr             # StepLR.step()
        if x_val is not None:
            logits = _val_logits(first, out, x_val, EVAL_BATCH)
            entry["val_loss"] = F.cross_entropy(logits, y_val, weight=weight).item()
            entry["val_acc"] = (logits.argmax(1) == y_val).float().mean().item()
            if result.best_acc is None or entry["val_acc"] > result.best_acc:
                result.best_acc, result.best_epoch = entry["val_acc"], epoch
                best_state = _state(first, out)
        result.history.append(entry)
    if best_state is None:
        result.best_epoch, best_state = cfg.epochs, _state(first, out)
    return best_state, result
