"""The mlp probe's training loop with its hidden layer on pipeline/lazy_sgd.py's windowed exact SGD.

An MLP (Linear -> ReLU -> Dropout(0) -> Linear) trained by SGD + momentum + StepLR with batch_size 4
spends most of each step passing over the first layer's (hidden, n_features) weights, its gradient and
its momentum buffer, although the step's gradient has rank 4. Here the first layer (bias folded in) is
a LazyLayer: each step reads its pre-activations from the window's projections and adds its rank-B
update to them; the small second layer (num_classes, hidden + 1) is updated directly every step, in the
order pipeline.sgd.SGD applies it. The result is fit_module's (the same initial weights, batch order,
loss, history and first-best val epoch) within float tolerance (tests/test_probes.py checks it against
torch.optim). Dropout > 0 is trained here on the CPU, alone or in a group: each MLP draws from its own
generator the masks fit_module draws from the global one; off the CPU (a fused kernel's masks) an MLP
with dropout stays on fit_module.

train_mlps trains several such MLPs together (the sweep's MLPs that share epochs, batch_size and
class_weight, pipeline/probe_groups.py): their first layers are the row groups of ONE LazyLayer (each
group its own lr, momentum and weight decay), so a window's batch gather, Gram, projections and
materialisation serve them all; each keeps its own output layer, StepLR, history and best epoch, and
ends with what it would reach trained alone with the same seed and batch order, to float rounding
(bitwise when the group's MLPs share lr and momentum, as on the digits check). A step's small ops are
few: its buffers and their views are made once per run, and the softmax, its gradient and the ReLU's
backward are one op for all the MLPs; the products and the output layer's update stay each MLP's own,
as one block-diagonal output layer for all would change their rounding (docs/heads.md).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.lazy_sgd import LazyLayer, epoch_windows, full_gram, packed, small_ops, window_steps, with_ones
from pipeline.runtime import flushed_subnormals

if TYPE_CHECKING:
    from pipeline.probes import FitResult, MLPConfig


class _OutputLayer:
    """The second layer W2 (C, hidden + 1), updated in place each step by pipeline.sgd's SGD (torch.optim's
    update) and StepLR; views of it made once (in-place updates keep them current)."""

    def __init__(self, weight: torch.Tensor, lr: float, momentum: float, weight_decay: float, step_size: int,
                 gamma: float) -> None:
        from pipeline.sgd import SGD, StepLR

        self.weight, self.wt, self.w_hidden = weight, weight.T, weight[:, :-1]
        self.grad = torch.empty_like(weight)
        self.opt = SGD([weight], lr, momentum, weight_decay)
        self.schedule = StepLR(self.opt, step_size, gamma)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def step(self, grad: torch.Tensor) -> None:
        self.weight.grad = grad
        self.opt.step()


class _Steps:
    """Buffers for a window's per-step tensors, kept for the run, and the views of each step's rows (s, e),
    made once: per MLP its ReLU outputs and a constant 1 (rows, hidden + 1; contiguous, as the product
    that reads them is bitwise the lone MLP's only then), and every MLP's logits and their gradients side
    by side (rows, M C)."""

    def __init__(self, rows: int, cols: list[tuple[int, int]], num_classes: int, device: torch.device) -> None:
        m = len(cols)
        self.shape, self.cols = (m, num_classes), cols
        self.h = [torch.ones(rows, b - a + 1, device=device) for a, b in cols]
        self.logits = torch.empty(rows, m * num_classes, device=device)
        self.g2 = torch.empty_like(self.logits)
        self._views: dict[tuple[int, int], tuple] = {}

    def views(self, s: int, e: int) -> tuple:
        """(the logits of rows s:e (rows, M, C), their gradients (rows, M, C), per MLP (its ReLU outputs, them
        and the 1, its logits, their gradients, transposed))."""
        v = self._views.get((s, e))
        if v is None:
            lg, g2, c = self.logits[s:e], self.g2[s:e], self.shape[1]
            mlps = []
            for i, h in enumerate(self.h):
                hi, g2i = h[s:e], g2[:, i * c:(i + 1) * c]
                mlps.append((hi[:, :-1], hi, lg[:, i * c:(i + 1) * c], g2i, g2i.T))
            v = self._views[s, e] = (lg.view(e - s, *self.shape), g2.view(e - s, *self.shape), mlps)
        return v


def _dropout_noise(drop: Optional[tuple[float, torch.Generator]], rows: int, hidden: int,
                   device: torch.device) -> Optional[torch.Tensor]:
    """nn.Dropout's multiplier for one step on the CPU: bernoulli(1 - p) / (1 - p), drawn from the MLP's own
    generator as fit_module draws it from the global one (the same shape, in the same order)."""
    if drop is None:
        return None
    p, generator = drop
    return torch.empty(rows, hidden, device=device).bernoulli_(1 - p, generator=generator).div_(1 - p)


_relu_backward = torch.ops.aten.threshold_backward.grad_input     # grad where input > 0, else 0: one op


def _mlp_window(first: LazyLayer, outs: list[_OutputLayer], steps: _Steps, yw: torch.Tensor, sw: torch.Tensor,
                drops: list) -> torch.Tensor:
    """Every step of the window begun on first, for each MLP (its hidden units are first's columns
    steps.cols[i]; drops[i] its (dropout p, generator) or None): (n, M C) the logits each step used. The
    softmax, its gradient and the ReLU's backward are one op for all MLPs; products and updates are each
    MLP's own, as when it runs alone."""
    n, device = len(first.z), first.z.device
    sizes = [e - s for s, e in first.bounds]
    target = (F.one_hot(yw, steps.shape[1]) * -sw)[:, None].split(sizes)   # minus the scaled one-hot (rows, 1, C)
    scale = sw[:, :, None].split(sizes)
    zs, gs = ([t[:, a:b].split(sizes) for a, b in steps.cols] for t in (first.z, first.g))   # [MLP][step]
    for k, (z, g, t, sc, (s, e)) in enumerate(zip(first.z.split(sizes), first.g.split(sizes), target, scale,
                                                  first.bounds)):
        lg3, g3, mlps = steps.views(s, e)
        noise = []
        for (hidden, h, lg, _, _), out, zi, drop in zip(mlps, outs, zs, drops):
            torch.clamp(zi[k], min=0, out=hidden)
            noise.append(_dropout_noise(drop, e - s, hidden.shape[1], device))
            if noise[-1] is not None:
                hidden.mul_(noise[-1])
            torch.mm(h, out.wt, out=lg)
        torch.addcmul(t, torch.softmax(lg3, 2), sc, out=g3)                   # d loss / d logits
        for (_, h, _, g2, g2t), out, gi, mult in zip(mlps, outs, gs, noise):
            torch.mm(g2, out.w_hidden, out=gi[k])
            if mult is not None:
                gi[k].mul_(mult)
            out.step(torch.mm(g2t, h, out=out.grad))
        _relu_backward(g, z, 0, grad_input=g)                                # back through the ReLU
        first.step(k)
    return steps.logits[:n]


def _mlp_epoch(first: LazyLayer, outs: list[_OutputLayer], steps: _Steps, x: torch.Tensor, labels: torch.Tensor,
               batch_size: int, generator: torch.Generator, class_weight: Optional[torch.Tensor],
               gram: Optional[torch.Tensor], drops: list) -> list[tuple[float, float]]:
    """One shuffled pass: per MLP, (mean train loss, train top-1), as train_one_epoch reports them."""
    total_loss = [torch.zeros((), device=x.device) for _ in outs]
    correct = [torch.zeros((), device=x.device) for _ in outs]
    for yw, sw, share in epoch_windows(first, x, labels, batch_size, generator, class_weight, gram):
        with small_ops(x.device):
            window = _mlp_window(first, outs, steps, yw, sw, drops)
        for i, logits in enumerate(window.split(steps.shape[1], 1)):
            logits = logits.contiguous()           # reduced as the MLP alone reduces its own
            nll = torch.logsumexp(logits, 1) - logits.gather(1, yw[:, None]).squeeze(1)
            total_loss[i] += (nll * share).sum()
            correct[i] += (logits.argmax(1) == yw).sum()
    n = max(len(x), 1)
    return [(loss.item() / n, right.item() / n) for loss, right in zip(total_loss, correct)]


def _state(w1: torch.Tensor, w2: torch.Tensor) -> dict:
    """The nn.Sequential state dict (on the CPU) of one MLP's weights (w1: its rows of the first layer)."""
    w1, w2 = w1.cpu(), w2.detach().cpu()
    return {"0.weight": w1[:, :-1].clone(), "0.bias": w1[:, -1].clone(),
            "3.weight": w2[:, :-1].clone(), "3.bias": w2[:, -1].clone()}


@torch.inference_mode()
def _val_hidden(first: LazyLayer, x_val: torch.Tensor, eval_batch: int) -> torch.Tensor:
    """(n_val, hidden of every MLP) the first layer's outputs on x_val (with its ones column), eval_batch rows at a time."""
    return torch.cat([first.eval_outputs(x_val, s, min(s + eval_batch, len(x_val)))
                      for s in range(0, len(x_val), eval_batch)])


class _Best:
    """Every MLP's best val epoch so far: the first layer's coordinates (LazyLayer.coordinates, all rows,
    an MLP's rows replaced when it improves; materialised once at the end) and each output layer."""

    def __init__(self, first: LazyLayer, outs: list[_OutputLayer]) -> None:
        self.coords, self.out = first.coordinates(), [o.weight.clone() for o in outs]

    def keep(self, i: int, rows: tuple[int, int], coords: torch.Tensor, out: _OutputLayer) -> None:
        self.coords[rows[0]:rows[1]] = coords[rows[0]:rows[1]]
        self.out[i] = out.weight.clone()

    def states(self, first: LazyLayer, cols: list[tuple[int, int]]) -> list[dict]:
        w1 = first.materialise(self.coords)
        return [_state(w1[a:b], w2) for (a, b), w2 in zip(cols, self.out)]


def _layers(models: list[nn.Sequential], cfgs: list["MLPConfig"],
            device: torch.device) -> tuple[LazyLayer, list[_OutputLayer], list[tuple[int, int]]]:
    """(the MLPs' first layers as one LazyLayer, their output layers, each one's columns of the LazyLayer)."""
    with torch.no_grad():
        w1 = torch.cat([packed(m[0]) for m in models]).to(device)
        first = LazyLayer(w1, [c.momentum for c in cfgs], [c.weight_decay for c in cfgs],
                          [m[0].out_features for m in models])
        outs = [_OutputLayer(packed(m[3]).to(device), float(c.lr), c.momentum,
                             c.weight_decay, c.step_size, c.gamma) for m, c in zip(models, cfgs)]
    ends = torch.tensor([m[0].out_features for m in models]).cumsum(0).tolist()
    return first, outs, list(zip([0] + ends[:-1], ends))


def _check_shared(cfgs: list["MLPConfig"], device: torch.device) -> "MLPConfig":
    """The first config, after checking that all share epochs, batch_size and class_weight (joint.SHARED), and
    that dropout, if any, is on the CPU (where fit_module's masks are bernoulli draws this loop can repeat)."""
    from pipeline.joint import SHARED, shared_key
    from pipeline.probes import ProbeError

    if not cfgs or len({shared_key(c) for c in cfgs}) > 1:
        raise ProbeError(f"jointly trained MLPs must share {', '.join(SHARED)} (group them with "
                         "probe_groups.mlp_group_key)")
    if device.type != "cpu" and any(c.dropout for c in cfgs):
        raise ProbeError(f"train_mlps: dropout > 0 on {device.type} draws its masks with a fused kernel: train "
                         "such an MLP alone (probes.fit_module)")
    return cfgs[0]


@flushed_subnormals()
def train_mlps(models: list[nn.Sequential], x: torch.Tensor, y: torch.Tensor, x_val: Optional[torch.Tensor],
               y_val: Optional[torch.Tensor], cfgs: list["MLPConfig"], num_classes: int, seed: int,
               device: torch.device, show_progress: bool = False) -> list[tuple[dict, "FitResult"]]:
    """fit_module for each MLPProbe model, all trained together over the same batches: per
    model, (its best epoch's state_dict on the CPU, its FitResult). The configs share epochs, batch_size
    and class_weight; lr, momentum, weight_decay, step_size, gamma, hidden and dropout (on the CPU: the
    masks fit_module would draw for it alone) are each model's own."""
    from pipeline.probes import EVAL_BATCH, FitResult, loss_weights

    shared = _check_shared(cfgs, torch.device(device))
    generator = torch.Generator().manual_seed(seed)
    # fit_module seeds the global generator with seed, and only dropout draws from it: each MLP its own copy
    drops = [(c.dropout, torch.Generator().manual_seed(seed)) if c.dropout else None for c in cfgs]
    models = [m.to(device) for m in models]             # on the device, as fit_module leaves it (predict_proba)
    weight = loss_weights(y.cpu(), num_classes, shared.class_weight)
    cw = weight.to(device) if weight is not None else None
    x, y = with_ones(x.to(device)), y.to(device)
    x_val = with_ones(x_val.to(device)) if x_val is not None else None
    y_val = y_val.to(device) if y_val is not None else None
    first, outs, cols = _layers(models, cfgs, device)
    steps = _Steps(min(window_steps(shared.batch_size) * shared.batch_size, len(x)), cols, num_classes, device)
    gram = full_gram(x, shared.epochs, shared.batch_size)
    first.use_dual(x, gram, shared.epochs, x_val)
    results, best = [FitResult(0, None) for _ in cfgs], _Best(first, outs)
    epochs = range(1, shared.epochs + 1)
    if show_progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc="MLP" if len(cfgs) == 1 else f"{len(cfgs)} MLPs", unit="epoch", leave=False)
    for epoch in epochs:
        lrs = [out.lr for out in outs]                 # both layers of an MLP follow its StepLR
        first.set_lr(lrs, shared.batch_size)
        train = _mlp_epoch(first, outs, steps, x, y, shared.batch_size, generator, cw, gram, drops)
        hidden = _val_hidden(first, x_val, EVAL_BATCH) if x_val is not None else None
        coords = None                                   # the first layer's coordinates, taken once an epoch
        for i, ((a, b), out, result) in enumerate(zip(cols, outs, results)):
            entry = {"epoch": epoch, "lr": lrs[i], "train_loss": train[i][0], "train_acc": train[i][1]}
            if hidden is not None:
                logits = torch.addmm(out.weight[:, -1], torch.relu(hidden[:, a:b]), out.weight[:, :-1].T)
                entry["val_loss"] = F.cross_entropy(logits, y_val, weight=cw).item()
                entry["val_acc"] = (logits.argmax(1) == y_val).float().mean().item()
                if result.best_acc is None or entry["val_acc"] > result.best_acc:
                    result.best_acc, result.best_epoch = entry["val_acc"], epoch
                    coords = first.coordinates() if coords is None else coords
                    best.keep(i, (a, b), coords, out)
            result.history.append(entry)
        for out in outs:
            out.schedule.step()
    if x_val is None:                                   # no val: every MLP keeps its last epoch
        best = _Best(first, outs)
        for result in results:
            result.best_epoch = shared.epochs
    return list(zip(best.states(first, cols), results))


def fit_mlp_lazy(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, x_val: Optional[torch.Tensor],
                 y_val: Optional[torch.Tensor], cfg: "MLPConfig", num_classes: int, seed: int, device: torch.device,
                 show_progress: bool = False) -> tuple[dict, "FitResult"]:
    """fit_module for an MLPProbe's model (dropout 0, or any on the CPU): (the best epoch's state_dict on the
    CPU, FitResult)."""
    return train_mlps([model], x, y, x_val, y_val, [cfg], num_classes, seed, device, show_progress)[0]
