"""Stage `head`: a new linear layer trained from the feature cache with SGD + StepLR."""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import nn

from pipeline.artifacts import save_checkpoint
from pipeline.config import Config, HeadConfig
from pipeline.engine import TensorBatches, evaluate, make_sgd, train_one_epoch
from pipeline.extract import load_features, to_tensors
from pipeline.metrics import update_metrics
from pipeline.runtime import environment_info
from pipeline.views import ensure_views

HEAD_FILE = "head.pt"
EVAL_BATCH = 4096


@dataclass
class HeadResult:
    state_dict: dict                      # the best epoch's weights
    best_epoch: int                       # 1-based
    best_acc: float
    history: list[dict] = field(default_factory=list)  # per epoch: lr, train/val loss and acc


def train_head(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
               num_classes: int, cfg: HeadConfig, device: torch.device, seed: int,
               train_views: Optional[torch.Tensor] = None) -> HeadResult:
    """Fit nn.Linear(feature_dim, num_classes) on (n_samples, feature_dim) features.

    train_views : optional tensor of shape (n_views, n_samples, feature_dim); when given, every
    epoch trains on one randomly drawn view per image instead of train_x (augmentation from cache).
    Evaluates on val after every epoch and keeps the best epoch's weights (first best on ties).
    """
    torch.manual_seed(seed)
    head = nn.Linear(train_x.shape[1], num_classes).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer, scheduler = make_sgd(head.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay,
                                    cfg.step_size, cfg.gamma)
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y, val_x, val_y = (t.to(device) for t in (train_x, train_y, val_x, val_y))
    train_batches = TensorBatches(train_x, train_y, cfg.batch_size, shuffle=True, generator=generator)
    val_batches = TensorBatches(val_x, val_y, EVAL_BATCH, shuffle=False)
    view_generator = torch.Generator().manual_seed(seed + 1)
    best = HeadResult(copy.deepcopy(head.state_dict()), 0, -1.0)
    for epoch in range(1, cfg.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        if train_views is not None:
            choice = torch.randint(len(train_views), (len(train_y),), generator=view_generator)
            epoch_x = train_views[choice, torch.arange(len(train_y))].to(device)  # (n_samples, feature_dim)
            train_batches = TensorBatches(epoch_x, train_y, cfg.batch_size, shuffle=True, generator=generator)
        train = train_one_epoch(head, criterion, optimizer, train_batches, device)
        scheduler.step()
        val = evaluate(head, criterion, val_batches, device)
        best.history.append({"epoch": epoch, "lr": lr, "train_loss": train["loss"], "train_acc": train["acc"],
                             "val_loss": val["loss"], "val_acc": val["acc"]})
        if val["acc"] > best.best_acc:
            best.best_acc, best.best_epoch = val["acc"], epoch
            best.state_dict = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    return best


def run_head(cfg: Config, device: torch.device) -> dict:
    t0 = time.perf_counter()
    features, plan = load_features(cfg, device)
    train_x, train_y = to_tensors(features.train)
    val_x, val_y = to_tensors(features.val)
    bank = ensure_views(cfg, plan, features.feature_dim, device)
    views = torch.from_numpy(bank.views.astype(np.float32, copy=False)) if bank else None
    t1 = time.perf_counter()
    result = train_head(train_x, train_y, val_x, val_y, len(features.classes), cfg.head, device, cfg.run.seed,
                        train_views=views)
    train_seconds = time.perf_counter() - t1
    path = save_checkpoint({
        "kind": "linear_head", "state_dict": result.state_dict, "classes": list(features.classes),
        "feature_dim": features.feature_dim, "backbone_config": dataclasses.asdict(cfg.backbone),
        "backbone": plan.spec.to_dict(), "head_config": dataclasses.asdict(cfg.head), "seed": cfg.run.seed,
        "cache_key": plan.key, "best_epoch": result.best_epoch, "val_acc": result.best_acc,
        "history": result.history, "versions": environment_info(device)}, cfg.run_dir / HEAD_FILE)
    entry = {"val_acc": round(result.best_acc, 4), "seconds": round(time.perf_counter() - t0, 3),
             "train_seconds": round(train_seconds, 3), "best_epoch": result.best_epoch,
             "epochs": cfg.head.epochs, "train_views": cfg.extract.train_views, "model_file": str(path),
             "history": result.history}
    print(f"head: best val_acc {result.best_acc:.4f} at epoch {result.best_epoch}/{cfg.head.epochs} "
          f"({train_seconds:.2f} s of training) -> {path}")
    update_metrics(cfg.run_dir, "head", entry)
    return entry
