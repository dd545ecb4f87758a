"""The head zoo: classifiers on cached features X of shape (n_samples, n_features), labels y in [0, num_classes).

Four types, each with a typed config whose defaults are visible in ``pipeline.probe_config``:
- ``linear``: ``nn.Linear`` trained with SGD + momentum + StepLR (the tutorial's fixed feature
  extractor, the same loop and defaults as the ``head`` stage), best val epoch kept, first best on ties;
- ``mlp``: one hidden layer (Linear -> ReLU -> Dropout -> Linear), trained with the same loop;
- ``knn``: weighted k-nearest neighbours on L2-normalised features, as in DINO's k-NN evaluation
  (Caron et al. 2021): cosine similarity, each of the k votes weighted by exp(similarity / temperature);
  no training, the train features are the model;
- ``ncm``: nearest class mean on centred, L2-normalised features (SimpleShot's CL2N, Wang et al. 2019).

Every probe has ``fit(X, y, X_val=None, y_val=None)``, ``predict_proba(X)`` (rows sum to 1) and
``predict(X)``, and ``state()`` / ``load_probe(state)`` for saving it in an artifact. Nothing here
imports scikit-learn: a warm head run does not pay for it.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.runtime import flushed_subnormals
from pipeline.sgd import SGD, StepLR
# Configs and input checks live in probe_config; re-exported so `from pipeline.probes import X` keeps working.
from pipeline.probe_config import (CLASS_WEIGHTS, CONFIGS, CONSTRAINTS, HEAD_TYPES, PARAM_HELP,  # noqa: F401
                                   Array, KNNConfig, LinearConfig, MLPConfig, NCMConfig, ProbeError,
                                   as_features, as_labels, balanced_weights, check_config, check_head_type,
                                   infer_num_classes, loss_weights, make_config, param_names)

EVAL_BATCH = 4096                 # rows per forward pass when evaluating / predicting
KNN_SIM_BYTES = 256 * 2 ** 20     # the (rows, n_train) similarity block of one kNN step, at most


# ----------------------------------------------------------------------------- the training loop
@dataclass
class FitResult:
    best_epoch: int                        # 1-based; the last epoch when there is no val split
    best_acc: Optional[float]              # val top-1 at best_epoch; None without val
    history: list[dict] = field(default_factory=list)  # per epoch: lr, train loss/acc, val loss/acc


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator):
    """Index batches over a fresh permutation (the head stage's TensorBatches order)."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                    y: torch.Tensor, batch_size: int, generator: torch.Generator) -> dict:
    """One shuffled pass of SGD over x (n_samples, n_features) on model's device; mean loss and accuracy."""
    model.train()
    device = x.device
    # Running sums stay on the device: a .item() per step would wait for the GPU every step.
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for idx in shuffled_batches(len(x), batch_size, generator):
        idx = idx.to(device, non_blocking=True)
        xb, yb = x[idx], y[idx]
        optimizer.zero_grad(set_to_none=True)
        logits = model(xb)
        loss = criterion(logits, yb)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            total_loss += loss.detach() * len(yb)
            correct += (logits.argmax(1) == yb).sum()
    n = max(len(x), 1)
    return {"loss": total_loss.item() / n, "acc": correct.item() / n}


@torch.inference_mode()
def logits_of(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(n_samples, num_classes) logits on the CPU, model in eval mode, EVAL_BATCH rows at a time."""
    model.eval()
    out = [model(x[s:s + EVAL_BATCH].to(device, non_blocking=True)).float().cpu()
           for s in range(0, len(x), EVAL_BATCH)]
    return torch.cat(out) if out else torch.zeros((0, 0))


@flushed_subnormals()
def fit_module(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_val: Optional[torch.Tensor],
               y_val: Optional[torch.Tensor], cfg: LinearConfig, num_classes: int, seed: int,
               device: torch.device, show_progress: bool = False) -> tuple[dict, FitResult]:
    """SGD + momentum + StepLR for cfg.epochs, evaluating on val after every epoch.

    Returns (the best epoch's state_dict on the CPU, FitResult): first best val top-1 on ties; the
    last epoch without val. The seeding and batch order are the head stage's, so a linear probe with
    the same seed trains the same weights.
    """
    torch.manual_seed(seed)            # dropout
    generator = torch.Generator().manual_seed(seed)
    model = model.to(device)
    x, y = x.to(device), y.to(device)
    x_val = x_val.to(device) if x_val is not None else None     # moved once, not every epoch
    weight = loss_weights(y.cpu(), num_classes, cfg.class_weight)
    criterion = nn.CrossEntropyLoss(weight=None if weight is None else weight.to(device))
    optimizer = SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)  # torch.optim's, bitwise
    result, best_state = FitResult(0, None), None
    epochs = range(1, cfg.epochs + 1)
    if show_progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc=type(model).__name__, unit="epoch", leave=False)
    for epoch in epochs:
        lr = optimizer.param_groups[0]["lr"]
        train = train_one_epoch(model, criterion, optimizer, x, y, cfg.batch_size, generator)
        scheduler.step()
        entry = {"epoch": epoch, "lr": lr, "train_loss": train["loss"], "train_acc": train["acc"]}
        if x_val is not None:
            logits = logits_of(model, x_val, device)
            entry["val_loss"] = F.cross_entropy(logits, y_val, weight=weight).item()
            entry["val_acc"] = (logits.argmax(1) == y_val).float().mean().item()
            if result.best_acc is None or entry["val_acc"] > result.best_acc:
                result.best_acc, result.best_epoch = entry["val_acc"], epoch
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        result.history.append(entry)
    if best_state is None:             # no val: the last epoch
        result.best_epoch = cfg.epochs
        best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return best_state, result


# ----------------------------------------------------------------------------- probes
class Probe:
    """Shared shape of every probe: fit on (X, y), then class probabilities for new rows."""

    head_type = ""

    def __init__(self, cfg: Any = None, num_classes: Optional[int] = None, seed: int = 0,
                 device: Union[str, torch.device] = "cpu", progress: bool = False) -> None:
        self.cfg = check_config(self.head_type, cfg if cfg is not None else CONFIGS[self.head_type]())
        self.num_classes, self.seed, self.device, self.progress = num_classes, seed, torch.device(device), progress
        self.n_features: Optional[int] = None
        self.result: Optional[FitResult] = None

    def _inputs(self, X, y, X_val, y_val):
        x = as_features(X)
        labels = as_labels(y, len(x))
        if len(x) == 0:
            raise ProbeError(f"{self.head_type}: no training samples")
        x_val = labels_val = None
        if X_val is not None:
            if y_val is None:
                raise ProbeError(f"{self.head_type}: X_val given without y_val")
            x_val = as_features(X_val, "X_val")
            labels_val = as_labels(y_val, len(x_val), "y_val")
            if x_val.shape[1] != x.shape[1]:
                raise ProbeError(f"X_val has {x_val.shape[1]} features but X has {x.shape[1]}")
            if len(x_val) == 0:
                x_val = labels_val = None
        n = self.num_classes or infer_num_classes(labels, labels_val)
        top = infer_num_classes(labels, labels_val)
        if top > n:
            raise ProbeError(f"{self.head_type}: labels go up to {top - 1} but num_classes is {n}")
        self.num_classes, self.n_features = n, x.shape[1]
        return x, labels, x_val, labels_val

    def _require_fitted(self) -> None:
        if self.n_features is None:
            raise ProbeError(f"this {self.head_type} probe is not fitted yet: call fit(X, y) first")

    def _check_fitted(self, X: Array) -> torch.Tensor:
        self._require_fitted()
        x = as_features(X)
        if x.shape[1] != self.n_features:
            raise ProbeError(f"X has {x.shape[1]} features but the {self.head_type} probe was fitted on "
                             f"{self.n_features}")
        return x

    def fit(self, X: Array, y: Array, X_val: Optional[Array] = None, y_val: Optional[Array] = None) -> "Probe":
        raise NotImplementedError

    def predict_proba(self, X: Array) -> np.ndarray:
        """(n_samples, num_classes) class probabilities, float32, rows summing to 1."""
        raise NotImplementedError

    def predict(self, X: Array) -> np.ndarray:
        """(n_samples,) the most probable class index of every row."""
        return self.predict_proba(X).argmax(1)

    def state(self) -> dict:
        """What an artifact stores to rebuild this fitted probe with load_probe (tensors on the CPU)."""
        self._require_fitted()
        return {"head_type": self.head_type, "config": dataclasses.asdict(self.cfg), "seed": self.seed,
                "num_classes": self.num_classes, "n_features": self.n_features, "tensors": self._tensors(),
                "best_epoch": self.result.best_epoch if self.result else None,
                "best_acc": self.result.best_acc if self.result else None}

    def _tensors(self) -> dict:
        raise NotImplementedError

    def _load_tensors(self, tensors: dict) -> None:
        raise NotImplementedError


class TrainedProbe(Probe):
    """A torch module trained by fit_module; the best val epoch's weights are kept."""

    def build(self, n_features: int, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def fit(self, X, y, X_val=None, y_val=None) -> "TrainedProbe":
        """Train on X (n_samples, n_features), y (n_samples,); choose the epoch on (X_val, y_val) if given."""
        x, labels, x_val, labels_val = self._inputs(X, y, X_val, y_val)
        torch.manual_seed(self.seed)   # the initial weights, as the head stage draws them
        self.model = self.build(x.shape[1], self.num_classes)
        state, self.result = self.trainer()(self.model, x, labels, x_val, labels_val, self.cfg, self.num_classes,
                                            self.seed, self.device, self.progress)
        self.model.load_state_dict(state)
        return self

    def trainer(self):
        """The training loop: fit_module's signature and result."""
        return fit_module

    def predict_proba(self, X) -> np.ndarray:
        x = self._check_fitted(X)
        return torch.softmax(logits_of(self.model, x, self.device), 1).numpy()

    def _tensors(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def _load_tensors(self, tensors: dict) -> None:
        self.model = self.build(self.n_features, self.num_classes)
        self.model.load_state_dict(tensors)
        self.model.to(self.device)


class LinearProbe(TrainedProbe):
    head_type = "linear"

    def build(self, n_features: int, num_classes: int) -> nn.Module:
        return nn.Linear(n_features, num_classes)

    def trainer(self):
        """joint.py's engine with one head (lazy_sgd's windows): fit_module's result, to float rounding."""
        from pipeline.joint import fit_linear

        return fit_linear


class MLPProbe(TrainedProbe):
    head_type = "mlp"

    def build(self, n_features: int, num_classes: int) -> nn.Module:
        return nn.Sequential(nn.Linear(n_features, self.cfg.hidden), nn.ReLU(), nn.Dropout(self.cfg.dropout),
                             nn.Linear(self.cfg.hidden, num_classes))

    def trainer(self):
        """The hidden layer trains on lazy_sgd's windows (pipeline/lazy_mlp.py): fit_module's result, dropout
        masks included on the CPU; dropout elsewhere keeps fit_module (a fused kernel draws the masks there)."""
        if self.cfg.dropout and self.device.type != "cpu":
            return fit_module
        from pipeline.lazy_mlp import fit_mlp_lazy

        return fit_mlp_lazy


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    return F.normalize(x, dim=1)


@torch.inference_mode()
def knn_proba(sims: torch.Tensor, neighbour_labels: torch.Tensor, temperature: float,
              num_classes: int) -> np.ndarray:
    """(n, num_classes) vote shares of the neighbours (sims, their labels: (n, k), most similar first),
    each vote weighted by exp(sim / temperature)."""
    # exp((sim - max) / T): the same weights after normalising, without overflow at small T
    weights = torch.exp((sims - sims[:, :1]) / temperature)
    votes = torch.zeros(len(sims), num_classes, device=sims.device)
    votes.scatter_add_(1, neighbour_labels, weights)
    return (votes / votes.sum(1, keepdim=True)).cpu().numpy()


class KNNProbe(Probe):
    """Weighted k-NN: the k most cosine-similar train rows vote with weight exp(sim / temperature)."""

    head_type = "knn"

    def fit(self, X, y, X_val=None, y_val=None) -> "KNNProbe":
        """Store the L2-normalised train features (the model); val is scored, not used."""
        x, labels, x_val, labels_val = self._inputs(X, y, X_val, y_val)
        self.bank = l2_normalise(x).to(self.device)        # (n_train, n_features)
        self.labels = labels.to(self.device)               # (n_train,)
        acc = None if x_val is None else float((self.predict(x_val) == labels_val.numpy()).mean())
        self.result = FitResult(0, acc)
        return self

    def predict_proba(self, X) -> np.ndarray:
        x = self._check_fitted(X)
        sims, idx = self.neighbours(x, self.cfg.k)
        return knn_proba(sims, self.labels[idx], self.cfg.temperature, self.num_classes)

    def neighbours(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarities (n, k'), train row indices (n, k')) of every row's k' = min(k, n_train) most
        cosine-similar train rows, most similar first; KNN_SIM_BYTES of similarities at a time."""
        k = min(k, len(self.bank))
        rows = max(1, KNN_SIM_BYTES // (4 * len(self.bank)))
        sims, idx = [], []
        with torch.inference_mode():
            for s in range(0, len(x), rows):
                q = l2_normalise(x[s:s + rows].to(self.device))              # (rows, n_features)
                top = (q @ self.bank.T).topk(k, dim=1)                       # (rows, k)
                sims.append(top.values)
                idx.append(top.indices)
        if not sims:
            return torch.zeros(0, k, device=self.device), torch.zeros(0, k, dtype=torch.long, device=self.device)
        return torch.cat(sims), torch.cat(idx)

    def _tensors(self) -> dict:
        return {"bank": self.bank.cpu(), "labels": self.labels.cpu()}

    def _load_tensors(self, tensors: dict) -> None:
        self.bank, self.labels = tensors["bank"].to(self.device), tensors["labels"].to(self.device)


class NCMProbe(Probe):
    """Nearest class mean: centre by the train mean, L2-normalise, nearest per-class mean (Euclidean)."""

    head_type = "ncm"

    def fit(self, X, y, X_val=None, y_val=None) -> "NCMProbe":
        x, labels, x_val, labels_val = self._inputs(X, y, X_val, y_val)
        self.mean = x.mean(0)                                          # (n_features,)
        z = l2_normalise(x - self.mean)
        sums = torch.zeros(self.num_classes, z.shape[1]).index_add_(0, labels, z)
        counts = torch.bincount(labels, minlength=self.num_classes)
        self.centroids = sums / counts.clamp(min=1)[:, None]          # (num_classes, n_features)
        self.present = counts > 0                                      # a class with no train row is never chosen
        acc = None if x_val is None else float((self.predict(x_val) == labels_val.numpy()).mean())
        self.result = FitResult(0, acc)
        return self

    def predict_proba(self, X) -> np.ndarray:
        return self.proba_from(self.distances(self._check_fitted(X)))

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """(n, num_classes) squared distances of the centred, L2-normalised rows to the class means."""
        out = []
        for s in range(0, len(x), EVAL_BATCH):
            z = l2_normalise(x[s:s + EVAL_BATCH] - self.mean)                              # (rows, n_features)
            out.append(((z * z).sum(1, keepdim=True) - 2 * z @ self.centroids.T
                        + (self.centroids * self.centroids).sum(1)).clamp(min=0))           # (rows, num_classes)
        return torch.cat(out) if out else torch.zeros(0, self.num_classes)

    def proba_from(self, d2: torch.Tensor) -> np.ndarray:
        """Class probabilities softmax(-d2 / (2 temperature)) of distances d2 (n, num_classes)."""
        logits = (-d2 / (2 * self.cfg.temperature)).masked_fill(~self.present, float("-inf"))
        return torch.softmax(logits, 1).numpy()

    def _tensors(self) -> dict:
        return {"mean": self.mean, "centroids": self.centroids, "present": self.present}

    def _load_tensors(self, tensors: dict) -> None:
        self.mean, self.centroids, self.present = tensors["mean"], tensors["centroids"], tensors["present"]


PROBES: dict[str, type] = {"linear": LinearProbe, "mlp": MLPProbe, "knn": KNNProbe, "ncm": NCMProbe}


def build_probe(head_type: str, params: Optional[dict] = None, num_classes: Optional[int] = None, seed: int = 0,
                device: Union[str, torch.device] = "cpu", progress: bool = False) -> Probe:
    """An unfitted probe of head_type with params over its defaults (unknown parameters are errors)."""
    cfg = make_config(head_type, params)
    return PROBES[head_type](cfg, num_classes=num_classes, seed=seed, device=device, progress=progress)


def load_probe(state: dict, device: Union[str, torch.device] = "cpu") -> Probe:
    """The fitted probe saved by Probe.state()."""
    head_type = check_head_type(state["head_type"])
    probe = build_probe(head_type, state["config"], num_classes=state["num_classes"], seed=state["seed"],
                        device=device)
    probe.n_features = state["n_features"]
    probe._load_tensors(copy.copy(state["tensors"]))
    if state.get("best_epoch") is not None or state.get("best_acc") is not None:
        probe.result = FitResult(state.get("best_epoch") or 0, state.get("best_acc"))
    return probe
