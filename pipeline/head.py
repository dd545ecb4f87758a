"""Stage `head`: a classifier trained from the feature cache with SGD + StepLR.

Two head types:
- ``linear``: a new ``nn.Linear(feature_dim, num_classes)`` (the tutorial's fixed feature extractor);
- ``classifier``: the backbone's own pretrained dense layers (VGG, AlexNet) with the last layer
  replaced, trained on the cached conv-trunk activations (``backbone.cut=conv``).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import nn

from pipeline import PipelineError
from pipeline.artifacts import MODEL_FILES, save_checkpoint
from pipeline.backbones import BackboneSpec, build_network, check_dense_classifier, dense_classifier
from pipeline.config import Config, HeadConfig
from pipeline.engine import TensorBatches, evaluate, make_sgd, predict, train_one_epoch
from pipeline.extract import load_features, to_tensors
from pipeline.metrics import update_metrics
from pipeline.report import Predictions, finish_stage
from pipeline.runtime import environment_info
from pipeline.views import ensure_views

HEAD_FILE = MODEL_FILES["head"]
EVAL_BATCH = 4096


@dataclass
class HeadResult:
    state_dict: dict                      # the best epoch's weights
    best_epoch: int                       # 1-based
    best_acc: float
    history: list[dict] = field(default_factory=list)  # per epoch: lr, train/val loss and acc


def check_head_type(cfg: Config) -> None:
    """head.type 'classifier' needs a VGG/AlexNet backbone cached at the conv cut."""
    if cfg.head.type != "classifier":
        return
    check_dense_classifier(cfg.backbone.name, "head.type 'classifier'", "use head.type=linear")
    if cfg.backbone.cut != "conv":
        raise PipelineError("head.type 'classifier' trains the backbone's own dense layers, whose input is "
                            "the flattened conv trunk: set backbone.cut=conv (or use head.type=linear)")


def build_head(cfg: Config, spec: BackboneSpec, feature_dim: int, num_classes: int) -> nn.Module:
    """The untrained head for cfg.head.type; (n_samples, feature_dim) -> (n_samples, num_classes) logits."""
    check_head_type(cfg)
    torch.manual_seed(cfg.run.seed)  # a random-init backbone ('none') must match the one that extracted
    if cfg.head.type == "classifier":
        head = dense_classifier(cfg.backbone.name, build_network(cfg.backbone, spec), num_classes)
        first = next(m for m in head if isinstance(m, nn.Linear))
        if first.in_features != feature_dim:
            raise PipelineError(f"the cached features have {feature_dim} values but {cfg.backbone.name}'s "
                                f"dense layers take {first.in_features}: re-run extract with backbone.cut=conv")
        return head
    return nn.Linear(feature_dim, num_classes)


def train_head(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
               num_classes: int, cfg: HeadConfig, device: torch.device, seed: int,
               head: Optional[nn.Module] = None, train_views: Optional[torch.Tensor] = None) -> HeadResult:
    """Fit head (default: nn.Linear(feature_dim, num_classes)) on (n_samples, feature_dim) features.

    train_views : optional tensor of shape (n_views, n_samples, feature_dim); when given, every
    epoch trains on one randomly drawn view per image instead of train_x (augmentation from cache).
    Evaluates on val after every epoch and keeps the best epoch's weights (first best on ties).
    """
    torch.manual_seed(seed)
    head = (head if head is not None else nn.Linear(train_x.shape[1], num_classes)).to(device)
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
    check_head_type(cfg)  # before spending minutes on extraction
    t0 = time.perf_counter()
    features, plan = load_features(cfg, device)
    train_x, train_y = to_tensors(features.train)
    val_x, val_y = to_tensors(features.val)
    head = build_head(cfg, plan.spec, features.feature_dim, len(features.classes))
    bank = ensure_views(cfg, plan, features.feature_dim, device)
    views = torch.from_numpy(bank.views.astype(np.float32, copy=False)) if bank else None
    t1 = time.perf_counter()
    result = train_head(train_x, train_y, val_x, val_y, len(features.classes), cfg.head, device, cfg.run.seed,
                        head=head, train_views=views)
    train_seconds = time.perf_counter() - t1
    artifact = {
        "kind": "head", "head_type": cfg.head.type, "state_dict": result.state_dict,
        "classes": list(features.classes), "feature_dim": features.feature_dim,
        "backbone_config": dataclasses.asdict(cfg.backbone), "backbone": plan.spec.to_dict(),
        "head_config": dataclasses.asdict(cfg.head), "seed": cfg.run.seed, "cache_key": plan.key,
        "cache_file": str(plan.path), "data_root": str(plan.data.root), "best_epoch": result.best_epoch,
        "val_acc": result.best_acc, "history": result.history, "versions": environment_info(device)}
    path = save_checkpoint(artifact, cfg.run_dir / HEAD_FILE)
    seconds = time.perf_counter() - t0
    entry = {"val_acc": round(result.best_acc, 4), "seconds": round(seconds, 3),
             "train_seconds": round(train_seconds, 3), "best_epoch": result.best_epoch,
             "epochs": cfg.head.epochs, "head_type": cfg.head.type, "train_views": cfg.extract.train_views,
             "model_file": str(path),
             "history": result.history}
    print(f"head: best val_acc {result.best_acc:.4f} at epoch {result.best_epoch}/{cfg.head.epochs} "
          f"({train_seconds:.2f} s of training) -> {path}")
    head.load_state_dict(result.state_dict)
    logits, _ = predict(head, TensorBatches(val_x, val_y, EVAL_BATCH, shuffle=False), device)
    preds = Predictions(torch.softmax(logits, 1).numpy(), features.val.labels, features.val.paths,
                        plan.data.root, list(features.classes))
    entry.update(finish_stage(cfg, "head", preds, artifact, history=result.history))
    update_metrics(cfg.run_dir, "head", entry)
    return entry
