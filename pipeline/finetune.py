"""Stage `finetune`: train the whole network on the images; never touches the feature cache."""
from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.artifacts import save_checkpoint
from pipeline.backbones import build_classifier, resolve_backbone
from pipeline.config import Config
from pipeline.data import ImageFolderData, ImageListDataset, eval_transform, load_image_folder, train_transform
from pipeline.engine import evaluate, make_sgd, train_one_epoch
from pipeline.metrics import update_metrics
from pipeline.runtime import environment_info

FINETUNE_FILE = "finetune.pt"


def make_loaders(data: ImageFolderData, pre, cfg: Config, device: torch.device) -> tuple[DataLoader, DataLoader]:
    ft = cfg.finetune
    train_tf = train_transform(pre) if ft.augment else eval_transform(pre)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    pin = device.type == "cuda"
    train = DataLoader(ImageListDataset(data.root, data.train, train_tf), batch_size=ft.batch_size,
                       shuffle=True, generator=generator, num_workers=cfg.data.num_workers, pin_memory=pin,
                       persistent_workers=cfg.data.num_workers > 0)
    val = DataLoader(ImageListDataset(data.root, data.val, eval_transform(pre)), batch_size=ft.batch_size,
                     shuffle=False, num_workers=cfg.data.num_workers, pin_memory=pin,
                     persistent_workers=cfg.data.num_workers > 0)
    return train, val


def run_finetune(cfg: Config, device: torch.device) -> dict:
    t0 = time.perf_counter()
    ft = cfg.finetune
    data = load_image_folder(cfg.data.root)
    spec = resolve_backbone(cfg.backbone, cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    model = build_classifier(cfg.backbone, spec, len(data.classes)).to(device)
    train_loader, val_loader = make_loaders(data, spec.preprocess, cfg, device)
    criterion = nn.CrossEntropyLoss()
    optimizer, scheduler = make_sgd(model.parameters(), ft.lr, ft.momentum, ft.weight_decay, ft.step_size, ft.gamma)
    print(f"finetune: {spec.name} on {len(data.train)} train / {len(data.val)} val images at "
          f"{spec.preprocess.crop_size} px, {ft.epochs} epochs on {device}")
    history, best_acc, best_epoch, epoch_seconds = [], -1.0, 0, []
    path = cfg.run_dir / FINETUNE_FILE
    for epoch in range(1, ft.epochs + 1):
        te = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train = train_one_epoch(model, criterion, optimizer, train_loader, device,
                                desc=f"finetune {epoch}/{ft.epochs}")
        scheduler.step()
        val = evaluate(model, criterion, val_loader, device)
        epoch_seconds.append(time.perf_counter() - te)
        history.append({"epoch": epoch, "lr": lr, "train_loss": train["loss"], "train_acc": train["acc"],
                        "val_loss": val["loss"], "val_acc": val["acc"], "seconds": epoch_seconds[-1]})
        print(f"finetune: epoch {epoch}/{ft.epochs} train_loss {train['loss']:.4f} "
              f"val_acc {val['acc']:.4f} ({epoch_seconds[-1]:.1f} s)")
        if val["acc"] > best_acc:
            best_acc, best_epoch = val["acc"], epoch
            # A consistent snapshot of the best epoch: enough to predict, or to resume from it.
            save_checkpoint({
                "kind": "finetune", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "val_acc": best_acc,
                "classes": list(data.classes), "backbone_config": dataclasses.asdict(cfg.backbone),
                "backbone": spec.to_dict(), "finetune_config": dataclasses.asdict(ft), "seed": cfg.run.seed,
                "versions": environment_info(device)}, path)
    entry = {"val_acc": round(best_acc, 4), "seconds": round(time.perf_counter() - t0, 3),
             "best_epoch": best_epoch, "epochs": ft.epochs,
             "seconds_per_epoch": round(sum(epoch_seconds) / len(epoch_seconds), 3),
             "train_images_per_second": round(len(data.train) * ft.epochs / sum(epoch_seconds), 1),
             "model_file": str(path), "history": history}
    print(f"finetune: best val_acc {best_acc:.4f} at epoch {best_epoch}/{ft.epochs} -> {path}")
    update_metrics(cfg.run_dir, "finetune", entry)
    return entry
