"""Stage `finetune`: train the whole network on the images; never touches the feature cache.

Under torchrun (`torchrun --nproc_per_node=N run_pipeline.py finetune`) the model is wrapped in
DistributedDataParallel and a DistributedSampler gives each process a disjoint 1/N of every
epoch's shuffled train images; `finetune.batch_size` is per process, so one SGD step sees
N x batch_size images. Each rank evaluates a contiguous slice of val and the slices are gathered,
so every rank selects the same best epoch from the full val set; only rank 0 writes the
checkpoint, metrics and reports. With one process nothing of this is used.

With finetune.init_head=cached the classifier starts from the head stage's head.pt (train the head
with the body frozen first, then unfreeze everything, as fastai does), and finetune.backbone_lr_mult
gives the pretrained body a smaller learning rate than the classifier.
"""
from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from pipeline import PipelineError
from pipeline import distributed as dd
from pipeline.artifacts import MODEL_FILES, load_checkpoint
from pipeline.backbones import AUX_CLASSIFIERS, BackboneSpec, build_classifier, classifier_path, resolve_backbone
from pipeline.config import Config, FinetuneConfig
from pipeline.data import ImageFolderData, ImageListDataset, eval_transform, load_image_folder, train_transform
from pipeline.engine import check_finite_loss, make_sgd, predict, score, train_one_epoch
from pipeline.fsutil import atomic_path
from pipeline.records import StageResult
from pipeline.report import Predictions, finish_stage
from pipeline.rundir import Publication
from pipeline.runtime import environment_info

FINETUNE_FILE = MODEL_FILES["finetune"]
# The best epoch so far of a finetune in progress (or interrupted): finetune.pt is replaced only when
# the run ends, so an interrupted run never replaces the last complete model; finetune.resume=true
# continues from this file.
BEST_SO_FAR_FILE = "finetune.best-so-far.pt"


def make_loaders(data: ImageFolderData, pre, cfg: Config, device: torch.device) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders; under torchrun this rank's share of each (see the module docstring)."""
    ft = cfg.finetune
    train_tf = train_transform(pre) if ft.augment else eval_transform(pre)
    pin = device.type == "cuda"
    common = {"batch_size": ft.batch_size, "num_workers": cfg.data.num_workers, "pin_memory": pin,
              "persistent_workers": cfg.data.num_workers > 0}
    train_set = ImageListDataset(data.root, data.train, train_tf)
    val_set = ImageListDataset(data.root, data.val, eval_transform(pre))
    if dd.is_distributed():
        sampler = DistributedSampler(train_set, num_replicas=dd.world_size(), rank=dd.rank(), shuffle=True,
                                     seed=cfg.run.seed)
        train = DataLoader(train_set, sampler=sampler, **common)
        val = DataLoader(Subset(val_set, val_slice(len(val_set))), shuffle=False, **common)
        return train, val
    generator = torch.Generator().manual_seed(cfg.run.seed)
    train = DataLoader(train_set, shuffle=True, generator=generator, **common)
    val = DataLoader(val_set, shuffle=False, **common)
    return train, val


def val_slice(n: int) -> range:
    """This rank's contiguous part of n val images (rank order = image order; no padding, no repeats)."""
    bounds = [n * r // dd.world_size() for r in range(dd.world_size() + 1)]
    return range(bounds[dd.rank()], bounds[dd.rank() + 1])


def gather_predictions(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, C), targets (N,)) for all of val, in order, on every rank."""
    logits, targets = predict(model, loader, device)
    parts = dd.all_gather((logits, targets))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def train_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                device: torch.device, desc: str) -> dict:
    """One epoch; under torchrun loss and accuracy are over every rank's images."""
    out = train_one_epoch(model, criterion, optimizer, loader, device, desc=desc)
    parts = dd.all_gather((out["loss"] * out["samples"], out["acc"] * out["samples"], out["samples"]))
    seen = sum(p[2] for p in parts)
    return {"loss": sum(p[0] for p in parts) / max(seen, 1), "acc": sum(p[1] for p in parts) / max(seen, 1),
            "samples": seen}


def load_cached_head(cfg: Config, spec: BackboneSpec, model: nn.Module, classes: tuple[str, ...]) -> list[str]:
    """Copy head.pt's weights into model's classifier; return the module paths that now hold them."""
    path = cfg.run_dir / MODEL_FILES["head"]
    if not path.is_file():
        raise PipelineError(f"finetune.init_head 'cached' starts from '{path}', which does not exist: "
                            "run the head stage first (python run_pipeline.py head finetune)")
    ckpt = load_checkpoint(path, cfg.run.trust_artifacts)
    trained_on = ckpt["backbone_config"]
    if (trained_on["name"], trained_on["image_size"], ckpt["backbone"]["weights_id"]) != \
            (cfg.backbone.name, cfg.backbone.image_size, spec.weights_id):
        raise PipelineError(f"finetune.init_head 'cached': '{path}' was trained on {trained_on['name']} "
                            f"features (weights {trained_on['weights']}, image_size {trained_on['image_size']}), "
                            "not on this backbone: run the head stage again with the same backbone settings")
    if list(ckpt["classes"]) != list(classes):
        raise PipelineError(f"finetune.init_head 'cached': '{path}' predicts {ckpt['classes']} but the data "
                            f"has {list(classes)}: run the head stage again on this data")
    if ckpt.get("head_type", "linear") == "classifier":
        model.classifier.load_state_dict(ckpt["state_dict"])
        return ["classifier"]
    if ckpt.get("head_type", "linear") not in ("linear", "logistic"):  # mlp, knn, ncm: not one nn.Linear
        raise PipelineError(f"finetune.init_head 'cached': '{path}' is a {ckpt['head_type']} head, which cannot "
                            "sit in the network: train a linear head first (head.type=linear), or use init_head=none")
    if trained_on.get("cut", "pool") != "pool" or cfg.backbone.name.startswith("squeezenet"):
        raise PipelineError("finetune.init_head 'cached' needs a head that can sit in the network: a linear "
                            "head on backbone.cut=pool features (not squeezenet, whose classifier is a conv "
                            "followed by ReLU), or head.type=classifier")
    layer_path = classifier_path(cfg.backbone.name, model)
    model.get_submodule(layer_path).load_state_dict(ckpt["state_dict"])
    return [layer_path]


def head_parameter_groups(model: nn.Module, head_paths: list[str], lr: float, backbone_lr_mult: float) -> list[dict]:
    """Two SGD groups: the classifier layers at lr (first), everything else at lr * backbone_lr_mult."""
    in_head = lambda name: any(name.startswith(p + ".") for p in head_paths)  # noqa: E731
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if in_head(n)], "lr": lr, "name": "head"},
            {"params": [p for n, p in named if not in_head(n)], "lr": lr * backbone_lr_mult, "name": "backbone"}]


def build_finetune_model(cfg: Config, spec: BackboneSpec, classes: tuple[str, ...]) -> tuple[nn.Module, list[str]]:
    """The network with new classifier layer(s), optionally warm-started; and the classifier's module paths."""
    torch.manual_seed(cfg.run.seed)
    model = build_classifier(cfg.backbone, spec, len(classes))
    if cfg.finetune.init_head == "cached":
        head_paths = load_cached_head(cfg, spec, model, classes)
    else:
        head_paths = [classifier_path(cfg.backbone.name, model)]
    return model, head_paths + list(AUX_CLASSIFIERS.get(cfg.backbone.name, ()))


def _banner(ft: FinetuneConfig, spec, data, device: torch.device) -> str:
    """The line finetune prints before its first epoch."""
    ranks = f" x {dd.world_size()} processes (DDP, {ft.batch_size} images per process per step)" \
        if dd.is_distributed() else ""
    return (f"finetune: {spec.name} on {len(data.train)} train / {len(data.val)} val images at "
            f"{spec.preprocess.crop_size} px, {ft.epochs} epochs on {device}{ranks}"
            + (", classifier from head.pt" if ft.init_head == "cached" else "")
            + (f", backbone lr x{ft.backbone_lr_mult:g}" if ft.backbone_lr_mult != 1 else ""))


def save_best_so_far(artifact: dict, path) -> None:
    """Atomically replace the best-so-far checkpoint (not recorded in SHA256SUMS: a record written
    beside it could be torn from it by a kill; it is read back only with weights_only=True)."""
    try:
        with atomic_path(path) as tmp:
            torch.save(artifact, tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        raise PipelineError(f"cannot save the best epoch so far to '{path}': "
                            f"{getattr(e, 'strerror', None) or str(e).splitlines()[0]} (free disk space or make "
                            "the run folder writable; finetune.pt is unchanged)") from None


def resume_checkpoint(cfg: Config, spec: BackboneSpec, data: ImageFolderData) -> dict | None:
    """The best-so-far checkpoint to continue from (finetune.resume), after checking it fits this run."""
    path = cfg.run_dir / BEST_SO_FAR_FILE
    if not cfg.finetune.resume:
        if path.is_file():
            print(f"finetune: '{path}' holds the best epoch of an interrupted finetune; starting over "
                  "(set finetune.resume=true to continue from it)")
        return None
    if not path.is_file():
        raise PipelineError(f"finetune.resume is true but there is no '{path}' (no interrupted finetune in this "
                            "run folder): run without finetune.resume")
    ckpt = load_checkpoint(path, trust=True)  # weights_only=True: tensors and containers, never code
    settings = lambda d: {k: v for k, v in d.items() if k not in ("epochs", "resume")}  # noqa: E731
    if (list(ckpt.get("classes", [])) != list(data.classes) or ckpt.get("data_root") != str(data.root)
            or ckpt.get("backbone", {}).get("weights_id") != spec.weights_id
            or ckpt.get("backbone_config") != dataclasses.asdict(cfg.backbone)
            or settings(ckpt.get("finetune_config", {})) != settings(dataclasses.asdict(cfg.finetune))):
        raise PipelineError(f"'{path}' was saved by a finetune with other data, backbone or finetune settings: "
                            "resume with those, or set finetune.resume=false to start over")
    if ckpt["epoch"] >= cfg.finetune.epochs:
        raise PipelineError(f"'{path}' is already at epoch {ckpt['epoch']} of finetune.epochs="
                            f"{cfg.finetune.epochs}: raise finetune.epochs to train on from it")
    return ckpt


def _resume_state(resumed: dict | None, optimizer, scheduler, run_dir) -> tuple[list, float, int, dict | None]:
    """(history, best_acc, best_epoch, artifact) to start the epochs from: a fresh run's, or the resumed one's."""
    if resumed is None:
        return [], -1.0, 0, None
    optimizer.load_state_dict(resumed["optimizer"])
    scheduler.load_state_dict(resumed["scheduler"])
    print(f"finetune: resuming from the best epoch so far, {resumed['epoch']} (val_acc {resumed['val_acc']:.4f}), "
          f"in {run_dir / BEST_SO_FAR_FILE}")
    return list(resumed["history"]), resumed["val_acc"], resumed["epoch"], resumed


def _snapshot(cfg: Config, spec: BackboneSpec, data: ImageFolderData, model: nn.Module, optimizer, scheduler,
              epoch: int, best_acc: float, history: list[dict], device: torch.device) -> dict:
    """A consistent snapshot of the best epoch: enough to predict, or to resume from it."""
    return {"kind": "finetune", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch, "val_acc": best_acc,
            "classes": list(data.classes), "backbone_config": dataclasses.asdict(cfg.backbone),
            "backbone": spec.to_dict(), "finetune_config": dataclasses.asdict(cfg.finetune), "seed": cfg.run.seed,
            "data_root": str(data.root), "history": history, "versions": environment_info(device),
            "processes": dd.world_size()}


def run_finetune(cfg: Config, device: torch.device) -> dict:
    t0 = time.perf_counter()
    ft = cfg.finetune
    data = load_image_folder(cfg.data.root)
    spec = resolve_backbone(cfg.backbone, cfg.run.seed)
    model, head_paths = build_finetune_model(cfg, spec, data.classes)
    resumed = resume_checkpoint(cfg, spec, data)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
    model = model.to(device)
    train_loader, val_loader = make_loaders(data, spec.preprocess, cfg, device)
    criterion = nn.CrossEntropyLoss()
    groups = head_parameter_groups(model, head_paths, ft.lr, ft.backbone_lr_mult)
    optimizer, scheduler = make_sgd(groups, ft.lr, ft.momentum, ft.weight_decay, ft.step_size, ft.gamma)
    history, best_acc, best_epoch, artifact = _resume_state(resumed, optimizer, scheduler, cfg.run_dir)
    # DDP averages gradients over ranks in backward; `model` stays the plain network for saving.
    trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dd.is_distributed() else model
    print(_banner(ft, spec, data, device))
    epoch_seconds, best_path = [], cfg.run_dir / BEST_SO_FAR_FILE
    for epoch in range(best_epoch + 1, ft.epochs + 1):
        te = time.perf_counter()
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)  # a different shuffle every epoch, the same on every rank
        lr, backbone_lr = (g["lr"] for g in optimizer.param_groups)
        train = train_epoch(trained, criterion, optimizer, train_loader, device, desc=f"finetune {epoch}/{ft.epochs}")
        check_finite_loss("finetune", train["loss"], epoch, "finetune.lr")
        scheduler.step()
        dd.sync_buffers(model)
        val = score(*gather_predictions(model, val_loader, device), criterion)
        epoch_seconds.append(time.perf_counter() - te)
        history.append({"epoch": epoch, "lr": lr, "backbone_lr": backbone_lr, "train_loss": train["loss"],
                        "train_acc": train["acc"], "val_loss": val["loss"], "val_acc": val["acc"],
                        "seconds": epoch_seconds[-1]})
        print(f"finetune: epoch {epoch}/{ft.epochs} train_loss {train['loss']:.4f} "
              f"val_acc {val['acc']:.4f} ({epoch_seconds[-1]:.1f} s)")
        if val["acc"] > best_acc:
            best_acc, best_epoch = val["acc"], epoch
            artifact = _snapshot(cfg, spec, data, model, optimizer, scheduler, epoch, best_acc, history, device)
            if dd.is_main():
                save_best_so_far(artifact, best_path)
    entry = _entry(cfg, data, best_acc, best_epoch, epoch_seconds, resumed, history, t0)
    if dd.is_main():
        full_val = None if dd.is_distributed() else val_loader  # rank 0 alone predicts all of val
        with dd.solo(), Publication(cfg.run_dir, "finetune") as pub:
            pub.adopt_model(best_path, FINETUNE_FILE)
            write_finetune_reports(cfg, model, data, spec, pub, entry, artifact, history, device, full_val)
            pub.commit(metrics_entry=entry, config=cfg.to_dict(), forget=(BEST_SO_FAR_FILE,))
    dd.barrier()
    return entry


def _entry(cfg: Config, data: ImageFolderData, best_acc: float, best_epoch: int, epoch_seconds: list[float],
           resumed: dict | None, history: list[dict], t0: float) -> dict:
    """The metrics entry (full precision; rounded only where shown), printed in one line."""
    ft, path = cfg.finetune, cfg.run_dir / FINETUNE_FILE
    train_seconds = sum(epoch_seconds)
    entry = StageResult("finetune", best_acc, time.perf_counter() - t0, str(path), history, {
        "best_epoch": best_epoch, "epochs": ft.epochs, "train_seconds": train_seconds,
        "seconds_per_epoch": train_seconds / len(epoch_seconds),
        "train_images_per_second": len(data.train) * len(epoch_seconds) / train_seconds,
        "resumed_from_epoch": resumed["epoch"] if resumed is not None else None,
        "init_head": ft.init_head, "backbone_lr_mult": ft.backbone_lr_mult, "processes": dd.world_size()}).to_dict()
    print(f"finetune: best val_acc {best_acc:.4f} at epoch {best_epoch}/{ft.epochs} -> {path}")
    return entry


def write_finetune_reports(cfg: Config, model: nn.Module, data: ImageFolderData, spec: BackboneSpec,
                           pub: Publication, entry: dict, artifact: dict, history: list[dict], device: torch.device,
                           val_loader: DataLoader | None) -> None:
    """Reload the staged best epoch, predict val, stage the reports and complete the metrics entry (rank 0)."""
    staged = pub.staging / FINETUNE_FILE
    model.load_state_dict(torch.load(staged, map_location="cpu", weights_only=True)["model"])  # the reports
    # describe the model being published (its SHA-256 was checked when it was staged)
    val_loader = val_loader or make_loaders(data, spec.preprocess, cfg, device)[1]
    logits, targets = predict(model, val_loader, device)
    preds = Predictions(torch.softmax(logits, 1).numpy(), targets.numpy(), list(data.val.paths), data.root,
                        list(data.classes))
    entry.update(finish_stage(cfg, "finetune", preds, artifact, history=history, publication=pub))
