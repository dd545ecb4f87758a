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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from pipeline import PipelineError
from pipeline.artifacts import MODEL_FILES, load_checkpoint
from pipeline.backbones import AUX_CLASSIFIERS, BackboneSpec, build_classifier, classifier_path, resolve_backbone
from pipeline.config import BackboneConfig, Config, DataConfig, FinetuneConfig
from pipeline.data import ImageFolderData, ImageListDataset, Split, eval_transform, load_dataset, train_transform
from pipeline.distributed import SINGLE, DistContext
from pipeline.engine import (FULL_PRECISION, MixedPrecision, check_finite_loss, make_sgd, predict, score, step_schedule,
                             train_one_epoch)
from pipeline.fsutil import atomic_path
from pipeline.metrics import BEST_EPOCH
from pipeline.records import ModelArtifact, StageResult
from pipeline.report import Predictions, data_split, finish_stage
from pipeline.rundir import Publication
from pipeline.runtime import environment_info
from pipeline.selection import score_test_probs, untested

FINETUNE_FILE = MODEL_FILES["finetune"]
# The best epoch so far of a finetune in progress (or interrupted): finetune.pt is replaced only when
# the run ends, so an interrupted run never replaces the last complete model; finetune.resume=true
# continues from this file.
BEST_SO_FAR_FILE = "finetune.best-so-far.pt"
# What a finetune model file holds beyond a model: enough to continue training from it.
RESUME_KEYS = ("epoch", "val_acc", "optimizer", "scheduler")


@dataclass(frozen=True)
class FinetuneJob:
    """What stage finetune reads of the config: its own section, the images', the backbone's and the seed."""

    data: DataConfig
    backbone: BackboneConfig
    finetune: FinetuneConfig
    seed: int                               # initialisation of the new layers, the shuffle
    run_dir: Path                           # head.pt (init_head=cached) and the best-so-far file
    trust_artifacts: bool                   # run.trust_artifacts, for reading head.pt

    @classmethod
    def of(cls, cfg: Config) -> "FinetuneJob":
        return cls(cfg.data, cfg.backbone, cfg.finetune, cfg.run.seed, cfg.run_dir, cfg.run.trust_artifacts)


@dataclass
class Finetuned:
    """What the epochs leave: the plain network, its best epoch as a model-file dict and the metrics entry."""

    model: nn.Module                        # not DDP-wrapped
    data: ImageFolderData
    spec: BackboneSpec
    artifact: dict                          # ModelArtifact.to_dict() of the best epoch
    history: list[dict]
    entry: dict                             # StageResult.to_dict()
    val_loader: DataLoader | None           # all of val in this process; None under torchrun (a slice)


def make_loaders(data: ImageFolderData, pre, job: FinetuneJob, device: torch.device,
                 dist: DistContext = SINGLE) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders; under torchrun this rank's share of each (see the module docstring)."""
    ft, workers = job.finetune, job.data.num_workers
    train_tf = train_transform(pre) if ft.augment else eval_transform(pre)
    pin = device.type == "cuda"
    common = {"batch_size": ft.batch_size, "num_workers": workers, "pin_memory": pin,
              "persistent_workers": workers > 0}
    train_set = ImageListDataset(data.root, data.train, train_tf)
    if dist.is_distributed:
        sampler = DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                     seed=job.seed)
        train = DataLoader(train_set, sampler=sampler, **common)
        val_set = ImageListDataset(data.root, data.val, eval_transform(pre))
        val = DataLoader(Subset(val_set, val_slice(len(val_set), dist)), shuffle=False, **common)
        return train, val
    generator = torch.Generator().manual_seed(job.seed)
    train = DataLoader(train_set, shuffle=True, generator=generator, **common)
    return train, eval_loader(data.root, data.val, pre, job, device, persistent=True)


def eval_loader(root, split: Split, pre, job: FinetuneJob, device: torch.device,
                persistent: bool = False) -> DataLoader:
    """split's images in order through the eval transform (val every epoch: persistent workers; test once)."""
    workers = job.data.num_workers
    return DataLoader(ImageListDataset(root, split, eval_transform(pre)), batch_size=job.finetune.batch_size,
                      shuffle=False, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=persistent and workers > 0)


def val_slice(n: int, dist: DistContext = SINGLE) -> range:
    """This rank's contiguous part of n val images (rank order = image order; no padding, no repeats)."""
    bounds = [n * r // dist.world_size for r in range(dist.world_size + 1)]
    return range(bounds[dist.rank], bounds[dist.rank + 1])


def gather_predictions(model: nn.Module, loader: DataLoader, device: torch.device,
                       dist: DistContext = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, C), targets (N,)) for all of val, in order, on every rank."""
    logits, targets = predict(model, loader, device)
    parts = dist.all_gather((logits, targets))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def train_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                device: torch.device, desc: str, dist: DistContext = SINGLE,
                precision: MixedPrecision = FULL_PRECISION) -> dict:
    """One epoch (its steps under precision's autocast); under torchrun, loss and accuracy over every rank's images."""
    out = train_one_epoch(model, criterion, optimizer, loader, device, desc=desc, precision=precision)
    parts = dist.all_gather((out["loss"] * out["samples"], out["acc"] * out["samples"], out["samples"]))
    seen = sum(p[2] for p in parts)
    # steps and skipped steps are this rank's: every rank takes the same steps on the same all-reduced gradients
    return {"loss": sum(p[0] for p in parts) / max(seen, 1), "acc": sum(p[1] for p in parts) / max(seen, 1),
            "samples": seen, "steps": out["steps"], "skipped": out["skipped"]}


def load_cached_head(job: FinetuneJob, spec: BackboneSpec, model: nn.Module, classes: tuple[str, ...]) -> list[str]:
    """Copy head.pt's weights into model's classifier; return the module paths that now hold them."""
    path, backbone = job.run_dir / MODEL_FILES["head"], job.backbone
    if not path.is_file():
        raise PipelineError(f"finetune.init_head 'cached' starts from '{path}', which does not exist: "
                            "run the head stage first (python run_pipeline.py head finetune)")
    head = ModelArtifact.from_dict(load_checkpoint(path, job.trust_artifacts), f"'{path}'", "head")
    trained_on = head.backbone_config
    if (trained_on["name"], trained_on["image_size"], head.backbone["weights_id"]) != \
            (backbone.name, backbone.image_size, spec.weights_id):
        raise PipelineError(f"finetune.init_head 'cached': '{path}' was trained on {trained_on['name']} "
                            f"features (weights {trained_on['weights']}, image_size {trained_on['image_size']}), "
                            "not on this backbone: run the head stage again with the same backbone settings")
    if head.classes != list(classes):
        raise PipelineError(f"finetune.init_head 'cached': '{path}' predicts {head.classes} but the data "
                            f"has {list(classes)}: run the head stage again on this data")
    if head.extra.get("head_type", "linear") == "classifier":
        model.classifier.load_state_dict(head.weights)
        return ["classifier"]
    head_type = head.extra.get("head_type", "linear")
    if head_type not in ("linear", "logistic"):  # mlp, knn, ncm: not one nn.Linear
        raise PipelineError(f"finetune.init_head 'cached': '{path}' is a {head_type} head, which cannot "
                            "sit in the network: train a linear head first (head.type=linear), or use init_head=none")
    if trained_on.get("cut", "pool") != "pool" or backbone.name.startswith("squeezenet"):
        raise PipelineError("finetune.init_head 'cached' needs a head that can sit in the network: a linear "
                            "head on backbone.cut=pool features (not squeezenet, whose classifier is a conv "
                            "followed by ReLU), or head.type=classifier")
    layer_path = classifier_path(backbone.name, model)
    model.get_submodule(layer_path).load_state_dict(head.weights)
    return [layer_path]


def head_parameter_groups(model: nn.Module, head_paths: list[str], lr: float, backbone_lr_mult: float) -> list[dict]:
    """Two SGD groups: the classifier layers at lr (first), everything else at lr * backbone_lr_mult."""
    in_head = lambda name: any(name.startswith(p + ".") for p in head_paths)  # noqa: E731
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if in_head(n)], "lr": lr, "name": "head"},
            {"params": [p for n, p in named if not in_head(n)], "lr": lr * backbone_lr_mult, "name": "backbone"}]


def build_finetune_model(job: FinetuneJob, spec: BackboneSpec, classes: tuple[str, ...]) -> tuple[nn.Module, list[str]]:
    """The network with new classifier layer(s), optionally warm-started; and the classifier's module paths.

    The new layers (and a random-init body) are drawn from job.seed by the build itself.
    """
    model = build_classifier(job.backbone, spec, len(classes), seed=job.seed)
    if job.finetune.init_head == "cached":
        head_paths = load_cached_head(job, spec, model, classes)
    else:
        head_paths = [classifier_path(job.backbone.name, model)]
    return model, head_paths + list(AUX_CLASSIFIERS.get(job.backbone.name, ()))


def _banner(ft: FinetuneConfig, spec, data, device: torch.device, dist: DistContext) -> str:
    """The line finetune prints before its first epoch."""
    ranks = f" x {dist.world_size} processes (DDP, {ft.batch_size} images per process per step)" \
        if dist.is_distributed else ""
    return (f"finetune: {spec.name} on {len(data.train)} train / {len(data.val)} val images at "
            f"{spec.preprocess.crop_size} px, {ft.epochs} epochs on {device}{ranks}"
            + (", classifier from head.pt" if ft.init_head == "cached" else "")
            + (f", backbone lr x{ft.backbone_lr_mult:g}" if ft.backbone_lr_mult != 1 else "")
            + (f", {ft.autocast} autocast" if ft.autocast != "none" else ""))


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


def read_finetune_file(path: Path) -> ModelArtifact:
    """A finetune model file (finetune.pt or the best-so-far file) as a record that can be trained on from.

    weights_only=True: tensors and containers, never code. A file without record_version is version 0;
    a newer version, or a file without what resuming needs, fails naming the file and its version.
    """
    artifact = ModelArtifact.from_dict(load_checkpoint(path, trust=True), f"'{path}'", "finetune")
    artifact.require(*RESUME_KEYS)
    return artifact


def resume_checkpoint(job: FinetuneJob, spec: BackboneSpec, data: ImageFolderData) -> ModelArtifact | None:
    """The best-so-far checkpoint to continue from (finetune.resume), after checking it fits this run."""
    path, ft = job.run_dir / BEST_SO_FAR_FILE, job.finetune
    if not ft.resume:
        if path.is_file():
            print(f"finetune: '{path}' holds the best epoch of an interrupted finetune; starting over "
                  "(set finetune.resume=true to continue from it)")
        return None
    if not path.is_file():
        raise PipelineError(f"finetune.resume is true but there is no '{path}' (no interrupted finetune in this "
                            "run folder): run without finetune.resume")
    ckpt = read_finetune_file(path)
    # a file written before finetune.autocast existed trained in float32
    settings = lambda d: {"autocast": "none", **{k: v for k, v in d.items()  # noqa: E731
                                                 if k not in ("epochs", "resume")}}
    if (ckpt.classes != list(data.classes) or ckpt.data_root != str(data.root)
            or ckpt.backbone.get("weights_id") != spec.weights_id
            or ckpt.backbone_config != dataclasses.asdict(job.backbone)
            or settings(ckpt.config) != settings(dataclasses.asdict(ft))):
        raise PipelineError(f"'{path}' was saved by a finetune with other data, backbone or finetune settings: "
                            "resume with those, or set finetune.resume=false to start over")
    split = ckpt.extra.get("data_split")  # absent in files written before splits were recorded
    if split is not None and split != data_split(job.data):
        changed = ", ".join(f"data.{k} {split.get(k)!r} -> {v!r}" for k, v in data_split(job.data).items()
                            if split.get(k) != v)
        raise PipelineError(f"'{path}' was saved by a finetune with another val/test split ({changed}): its "
                            "best epoch was chosen on other val images; resume with those data.* settings, or "
                            "set finetune.resume=false to start over")
    if ckpt.extra["epoch"] >= ft.epochs:
        raise PipelineError(f"'{path}' is already at epoch {ckpt.extra['epoch']} of finetune.epochs="
                            f"{ft.epochs}: raise finetune.epochs to train on from it")
    return ckpt


def _resume_state(resumed: ModelArtifact | None, optimizer, scheduler, precision: MixedPrecision,
                  run_dir) -> tuple[list, float, int, dict | None]:
    """(history, best_acc, best_epoch, artifact) to start the epochs from: a fresh run's, or the resumed one's."""
    if resumed is None:
        return [], -1.0, 0, None
    optimizer.load_state_dict(resumed.extra["optimizer"])
    scheduler.load_state_dict(resumed.extra["scheduler"])
    if precision.scaler is not None and resumed.extra.get("scaler"):
        precision.scaler.load_state_dict(resumed.extra["scaler"])
    epoch, val_acc = resumed.extra["epoch"], resumed.extra["val_acc"]
    print(f"finetune: resuming from the best epoch so far, {epoch} (val_acc {val_acc:.4f}), "
          f"in {run_dir / BEST_SO_FAR_FILE}")
    return list(resumed.history), val_acc, epoch, resumed.to_dict()


def _snapshot(job: FinetuneJob, spec: BackboneSpec, data: ImageFolderData, model: nn.Module, optimizer, scheduler,
              epoch: int, best_acc: float, history: list[dict], device: torch.device, dist: DistContext,
              precision: MixedPrecision) -> dict:
    """A consistent snapshot of the best epoch: enough to predict, or to resume from it."""
    return ModelArtifact(
        "finetune", list(data.classes), model.state_dict(), dataclasses.asdict(job.finetune), spec.to_dict(),
        dataclasses.asdict(job.backbone), job.seed, str(data.root), history=history,
        versions=environment_info(device),
        extra={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
               "val_acc": best_acc, "processes": dist.world_size, "data_split": data_split(job.data),
               "scaler": precision.scaler.state_dict() if precision.scaler is not None else None}).to_dict()


def _prepare(job: FinetuneJob, device: torch.device):
    """The images, the backbone, the network on device (resumed if asked), its optimizer and where to start."""
    ft = job.finetune
    data = load_dataset(job.data)
    spec = resolve_backbone(job.backbone, job.seed)
    model, head_paths = build_finetune_model(job, spec, data.classes)
    resumed = resume_checkpoint(job, spec, data)
    if resumed is not None:
        model.load_state_dict(resumed.weights)
    model = model.to(device)
    groups = head_parameter_groups(model, head_paths, ft.lr, ft.backbone_lr_mult)
    optimizer, scheduler = make_sgd(groups, ft.lr, ft.momentum, ft.weight_decay, ft.step_size, ft.gamma)
    return data, spec, model, optimizer, scheduler, resumed


def finetune_stage(job: FinetuneJob, device: torch.device, dist: DistContext = SINGLE) -> Finetuned:
    """The finetune stage's core: train for finetune.epochs, keeping the best epoch in the best-so-far file."""
    t0 = time.perf_counter()
    ft = job.finetune
    data, spec, model, optimizer, scheduler, resumed = _prepare(job, device)
    train_loader, val_loader = make_loaders(data, spec.preprocess, job, device, dist)
    criterion, precision = nn.CrossEntropyLoss(), MixedPrecision(ft.autocast, device)
    history, best_acc, best_epoch, artifact = _resume_state(resumed, optimizer, scheduler, precision, job.run_dir)
    # DDP averages gradients over ranks in backward; `model` stays the plain network for saving.
    trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.is_distributed else model
    print(_banner(ft, spec, data, device, dist))
    epoch_seconds, best_path = [], job.run_dir / BEST_SO_FAR_FILE
    for epoch in range(best_epoch + 1, ft.epochs + 1):
        te = time.perf_counter()
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)  # a different shuffle every epoch, the same on every rank
        lr, backbone_lr = (g["lr"] for g in optimizer.param_groups)
        train = train_epoch(trained, criterion, optimizer, train_loader, device,
                            f"finetune {epoch}/{ft.epochs}", dist, precision)
        check_finite_loss("finetune", train["loss"], epoch, "finetune.lr")
        step_schedule(scheduler)
        dist.sync_buffers(model)
        val = score(*gather_predictions(model, val_loader, device, dist), criterion)
        epoch_seconds.append(time.perf_counter() - te)
        history.append({"epoch": epoch, "lr": lr, "backbone_lr": backbone_lr, "train_loss": train["loss"],
                        "train_acc": train["acc"], "val_loss": val["loss"], "val_acc": val["acc"],
                        "seconds": epoch_seconds[-1],
                        **({"skipped_steps": train["skipped"]} if precision.scaler is not None else {})})
        print(f"finetune: epoch {epoch}/{ft.epochs} train_loss {train['loss']:.4f} "
              f"val_acc {val['acc']:.4f} ({epoch_seconds[-1]:.1f} s){precision.skipped_note(train)}")
        if val["acc"] > best_acc:
            best_acc, best_epoch = val["acc"], epoch
            artifact = _snapshot(job, spec, data, model, optimizer, scheduler, epoch, best_acc, history, device, dist,
                                 precision)
            if dist.is_main:
                save_best_so_far(artifact, best_path)
    entry = _entry(job, data, best_acc, best_epoch, epoch_seconds, resumed, history, t0, dist)
    return Finetuned(model, data, spec, artifact, history, entry, None if dist.is_distributed else val_loader)


def run_finetune(cfg: Config, device: torch.device, dist: DistContext = SINGLE) -> dict:
    """Stage `finetune`: every rank trains (under torchrun); rank 0 alone publishes the best epoch."""
    done = finetune_stage(FinetuneJob.of(cfg), device, dist)
    if dist.is_main:
        publish_finetune(cfg, done, device)
    dist.barrier()
    return done.entry


def _entry(job: FinetuneJob, data: ImageFolderData, best_acc: float, best_epoch: int, epoch_seconds: list[float],
           resumed: ModelArtifact | None, history: list[dict], t0: float, dist: DistContext) -> dict:
    """The metrics entry (full precision; rounded only where shown), printed in one line."""
    ft, path = job.finetune, job.run_dir / FINETUNE_FILE
    train_seconds = sum(epoch_seconds)
    entry = StageResult("finetune", best_acc, time.perf_counter() - t0, str(path), history, {
        "best_epoch": best_epoch, "epochs": ft.epochs, "train_seconds": train_seconds,
        "seconds_per_epoch": train_seconds / len(epoch_seconds),
        "train_images_per_second": len(data.train) * len(epoch_seconds) / train_seconds,
        "resumed_from_epoch": resumed.extra["epoch"] if resumed is not None else None,
        "init_head": ft.init_head, "backbone_lr_mult": ft.backbone_lr_mult, "processes": dist.world_size}).to_dict()
    print(f"finetune: best val_acc {best_acc:.4f} at epoch {best_epoch}/{ft.epochs} -> {path}")
    return entry


def score_finetune_test(done: Finetuned, job: FinetuneJob, device: torch.device) -> dict:
    """The kept epoch (done.model, already reloaded from the published file) scored once on the test images;
    the best epoch was chosen on val alone. Without a test split: selected_on and test_acc None."""
    chosen_on = BEST_EPOCH
    test = done.data.test
    if test is None or not len(test):
        return untested(chosen_on)
    logits, targets = predict(done.model, eval_loader(done.data.root, test, done.spec.preprocess, job, device), device)
    return score_test_probs("finetune", targets.numpy(), torch.softmax(logits, 1).numpy(), chosen_on)


def publish_finetune(cfg: Config, done: Finetuned, device: torch.device) -> None:
    """Rank 0, as a single process: publish the best epoch with its reports, metrics entry and config.json.

    The reports describe the model being published: the staged file is reloaded (its SHA-256 was checked
    when it was staged) and predicts all of val, and (once) the test split if there is one.
    """
    job = FinetuneJob.of(cfg)
    with Publication(cfg.run_dir, "finetune") as pub:
        pub.adopt_model(cfg.run_dir / BEST_SO_FAR_FILE, FINETUNE_FILE)
        done.model.load_state_dict(read_finetune_file(pub.staging / FINETUNE_FILE).weights)
        val_loader = done.val_loader or eval_loader(done.data.root, done.data.val, done.spec.preprocess, job, device)
        logits, targets = predict(done.model, val_loader, device)
        preds = Predictions(torch.softmax(logits, 1).numpy(), targets.numpy(), list(done.data.val.paths),
                            done.data.root, list(done.data.classes))
        done.entry.update(score_finetune_test(done, job, device))
        done.entry.update(finish_stage(cfg.report, "finetune", preds, done.artifact, pub, history=done.history))
        pub.commit(metrics_entry=done.entry, config=cfg.to_dict(), forget=(BEST_SO_FAR_FILE,))
