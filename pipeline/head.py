"""Stage `head`: a classifier trained from the feature cache.

The features are loaded whole, or, when they exceed head.max_memory_gb, streamed from the cache
in chunks (pipeline/stream.py); both feed the same epoch loop, `fit_head`.

Head types (head.type):
- ``linear``: a new ``nn.Linear(feature_dim, num_classes)`` (the tutorial's fixed feature extractor),
  SGD + momentum + StepLR;
- ``classifier``: the backbone's own pretrained dense layers (VGG, AlexNet) with the last layer
  replaced, trained on the cached conv-trunk activations (``backbone.cut=conv``);
- ``mlp``, ``knn``, ``ncm``: the probes of pipeline/probes.py, features in memory only.
The core functions take the head's own section (HeadConfig), a device and a seed; `run_head`
unpacks the Config.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import torch
from torch import nn

from pipeline import PipelineError
from pipeline import cache as fc
from pipeline.artifacts import MODEL_FILES
from pipeline.config import BackboneConfig, Config, HeadConfig
from pipeline.engine import TensorBatches, check_finite_loss, evaluate, make_sgd, predict, to_tensors, train_one_epoch
from pipeline.head_outputs import (compact_params, confused_text, head_values, ledger_entry, record_heads,
                                   stage_error_analysis, test_split)
from pipeline.metrics import BEST_EPOCH
from pipeline.orchestrate import StageFeatures, stage_features
from pipeline.probes import CONFIGS, LinearConfig, Probe, build_probe, loss_weights
from pipeline.records import ModelArtifact, StageResult
from pipeline.report import Predictions, finish_stage
from pipeline.rundir import Publication
from pipeline.selection import score_test, score_test_probs
from pipeline.runtime import environment_info, flushed_subnormals
from pipeline.stream import (MIB, TRAIN_SHARE, VAL_SHARE, StreamBatches, budget_bytes, check_views_budget,
                             float32_nbytes, needs_streaming, size_text, stream_message)

HEAD_FILE = MODEL_FILES["head"]
EVAL_BATCH = 4096
PROBE_TYPES = ("mlp", "knn", "ncm")   # trained by pipeline.probes, on features in memory


@dataclass
class HeadResult:
    state_dict: dict                      # the best epoch's weights
    best_epoch: int                       # 1-based
    best_acc: float
    history: list[dict] = field(default_factory=list)  # per epoch: lr, train/val loss and acc


def check_head_type(head_type: str, backbone: BackboneConfig, train_views: int = 0) -> None:
    """head.type 'classifier' needs a VGG/AlexNet backbone cached at the conv cut; the probes, no view bank."""
    if head_type in PROBE_TYPES and train_views:
        raise PipelineError(f"head.type '{head_type}' trains on the clean cached features: set extract.train_views=0 "
                            "(the augmented views are drawn by head.type linear or classifier)")
    if head_type != "classifier":
        return
    from pipeline.backbones import check_dense_classifier

    check_dense_classifier(backbone.name, "head.type 'classifier'", "use head.type=linear")
    if backbone.cut != "conv":
        raise PipelineError("head.type 'classifier' trains the backbone's own dense layers, whose input is "
                            "the flattened conv trunk: set backbone.cut=conv (or use head.type=linear)")


def build_head(head_type: str, backbone: BackboneConfig, spec, seed: int, feature_dim: int,
               num_classes: int) -> nn.Module:
    """The untrained head; (n_samples, feature_dim) -> (n_samples, num_classes) logits.

    spec: the backbones.BackboneSpec of the cached features. The new layer is initialised from seed;
    a random-init backbone ('none') is built from seed too, so it matches the one that extracted.
    """
    check_head_type(head_type, backbone)
    torch.manual_seed(seed)
    if head_type == "classifier":
        from pipeline.backbones import build_network, dense_classifier

        head = dense_classifier(backbone.name, build_network(backbone, spec, seed), num_classes)
        first = next(m for m in head if isinstance(m, nn.Linear))
        if first.in_features != feature_dim:
            raise PipelineError(f"the cached features have {feature_dim} values but {backbone.name}'s "
                                f"dense layers take {first.in_features}: re-run extract with backbone.cut=conv")
        return head
    return nn.Linear(feature_dim, num_classes)


class ViewBatches:
    """Each pass draws one of the K augmented views of every image, then batches them like TensorBatches.

    views : (n_views, n_samples, feature_dim); y : (n_samples,)
    """

    def __init__(self, views: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator,
                 view_generator: torch.Generator, device: torch.device) -> None:
        self.views, self.y, self.batch_size = views, y, batch_size
        self.generator, self.view_generator, self.device = generator, view_generator, device

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self):
        choice = torch.randint(len(self.views), (len(self.y),), generator=self.view_generator)
        x = self.views[choice, torch.arange(len(self.y))].to(self.device)  # (n_samples, feature_dim)
        yield from TensorBatches(x, self.y, self.batch_size, shuffle=True, generator=self.generator)


@flushed_subnormals()
def fit_head(head: nn.Module, train_batches: Iterable, val_batches: Iterable, cfg: HeadConfig,
             device: torch.device, seed: int, class_weight: Optional[torch.Tensor] = None) -> HeadResult:
    """SGD + StepLR over train_batches for cfg.epochs; evaluate on val_batches after every epoch.

    train_batches, val_batches : re-iterable (x, y) mini-batches, x of shape (batch, feature_dim):
    in memory (engine.TensorBatches) or streamed from the cache (stream.StreamBatches).
    class_weight : (num_classes,) loss weights (head.class_weight=balanced), or None.
    Keeps the best epoch's weights (first best on ties).
    """
    torch.manual_seed(seed)  # dropout in a classifier head
    head = head.to(device)
    criterion = nn.CrossEntropyLoss(weight=None if class_weight is None else class_weight.to(device))
    optimizer, scheduler = make_sgd(head.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay,
                                    cfg.step_size, cfg.gamma, light=True)
    best = HeadResult(copy.deepcopy(head.state_dict()), 0, -1.0)
    for epoch in range(1, cfg.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        train = train_one_epoch(head, criterion, optimizer, train_batches, device)
        check_finite_loss("head", train["loss"], epoch, "head.lr")
        scheduler.step()
        val = evaluate(head, criterion, val_batches, device)
        best.history.append({"epoch": epoch, "lr": lr, "train_loss": train["loss"], "train_acc": train["acc"],
                             "val_loss": val["loss"], "val_acc": val["acc"]})
        if val["acc"] > best.best_acc:
            best.best_acc, best.best_epoch = val["acc"], epoch
            best.state_dict = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    return best


def train_head(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
               num_classes: int, cfg: HeadConfig, device: torch.device, seed: int,
               head: Optional[nn.Module] = None, train_views: Optional[torch.Tensor] = None) -> HeadResult:
    """Fit head (default: nn.Linear(feature_dim, num_classes)) on in-memory (n_samples, feature_dim) features.

    train_views : optional tensor of shape (n_views, n_samples, feature_dim); when given, every
    epoch trains on one randomly drawn view per image instead of train_x (augmentation from cache).
    """
    torch.manual_seed(seed)
    head = head if head is not None else nn.Linear(train_x.shape[1], num_classes)
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y, val_x, val_y = (t.to(device) for t in (train_x, train_y, val_x, val_y))
    if train_views is not None:
        train_batches = ViewBatches(train_views, train_y, cfg.batch_size, generator,
                                    torch.Generator().manual_seed(seed + 1), device)
    else:
        train_batches = TensorBatches(train_x, train_y, cfg.batch_size, shuffle=True, generator=generator)
    weight = loss_weights(train_y.cpu(), num_classes, cfg.class_weight)
    return fit_head(head, train_batches, TensorBatches(val_x, val_y, EVAL_BATCH, shuffle=False), cfg, device, seed,
                    weight)


def train_linear_batched(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                         num_classes: int, cfg: HeadConfig, device: torch.device, seed: int,
                         init_seed: int) -> HeadResult:
    """The linear head of train_head through pipeline.joint's batched engine (one head): the same nn.Linear
    initialisation (init_seed), batch order (seed), loss and SGD + StepLR updates, written out by hand, so
    the weights agree with train_head's to float rounding (tests/test_head.py), without autograd,
    optimizer objects or full-size weight passes per step (pipeline/lazy_sgd.py's windows; docs/heads.md)."""
    from pipeline.joint import initial_weights, train_linear_heads

    linear = LinearConfig(**head_values(cfg, "linear"))
    joint = train_linear_heads(train_x, train_y, val_x, val_y, [linear], num_classes=num_classes, seed=seed,
                               device=device, init=initial_weights(train_x.shape[1], num_classes, init_seed))
    (result,) = joint.results
    for entry in result.history:
        check_finite_loss("head", entry["train_loss"], entry["epoch"], "head.lr")
    state = {"weight": joint.weight[0].clone(), "bias": joint.bias[0].clone()}
    return HeadResult(state, result.best_epoch, result.best_acc, result.history)


def probe_params(cfg: HeadConfig) -> dict:
    """The head.* values a probe of cfg.type takes (pipeline.probe_config's parameters)."""
    return head_values(cfg, cfg.type)


def train_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                num_classes: int, cfg: HeadConfig, device: torch.device, seed: int) -> Probe:
    """A fitted mlp, knn or ncm probe on (n_samples, feature_dim) features; the epoch (mlp) chosen on val."""
    probe = build_probe(cfg.type, probe_params(cfg), num_classes=num_classes, seed=seed, device=device)
    probe.fit(train_x, train_y, val_x, val_y)
    for entry in probe.result.history:
        check_finite_loss("head", entry["train_loss"], entry["epoch"], "head.lr")
    return probe


@dataclass
class FittedHead:
    """A trained head, whatever its type: what head.pt stores and its probabilities on val."""

    weights: dict                          # head.pt's state_dict: a module's weights, or a probe's state()
    best_epoch: Optional[int]              # None for knn / ncm (no training)
    best_acc: float                        # val top-1 of the kept weights
    history: list
    val_probs: np.ndarray                  # (n_val, num_classes), cache order
    proba: object                          # features (n, feature_dim) -> (n, num_classes) probabilities


def fitted_module(head: nn.Module, result: HeadResult, val_batches: Iterable, device: torch.device) -> FittedHead:
    """The kept weights' val probabilities; best_acc recomputed from them as correct / n (float64)."""
    head = head.to(device)  # the batched engine trains its own tensors: the module may still be on the CPU
    head.load_state_dict(result.state_dict)
    logits, targets = predict(head, val_batches, device)
    if len(targets):
        result.best_acc = int((logits.argmax(1) == targets).sum()) / len(targets)

    def proba(x: np.ndarray) -> np.ndarray:
        batches = TensorBatches(torch.from_numpy(x), torch.zeros(len(x), dtype=torch.long), EVAL_BATCH, False)
        return torch.softmax(predict(head, batches, device)[0], 1).numpy()

    return FittedHead(result.state_dict, result.best_epoch, result.best_acc, result.history,
                      torch.softmax(logits, 1).numpy(), proba)


def fitted_probe(probe: Probe, val_x: torch.Tensor) -> FittedHead:
    trained = probe.head_type == "mlp"
    return FittedHead(probe.state(), probe.result.best_epoch if trained else None, float(probe.result.best_acc or 0.0),
                      probe.result.history, probe.predict_proba(val_x), probe.predict_proba)


@dataclass
class HeadData:
    """What training and the reports need, whether the features are in memory or streamed."""

    classes: tuple[str, ...]
    feature_dim: int
    val_batches: Iterable        # (x, y) in cache order
    val_labels: np.ndarray       # (n_val,)
    val_paths: list[str]
    info: dict                   # for metrics.json: streamed, buffer size
    test: Optional[object] = None  # the cache's test split (in memory), scored once for the kept head
    test_scores: Optional[dict] = None  # streamed: the kept head's test fields, scored once from the cache


def run_head(cfg: Config, device: torch.device) -> dict:
    """Stage `head`: train on the cache from stage_features (features.file, or data.root's)."""
    if not cfg.features.file:
        check_head_type(cfg.head.type, cfg.backbone, cfg.extract.train_views)  # before minutes of extraction
    t0 = time.perf_counter()
    inputs = stage_features(cfg, device)
    backbone = BackboneConfig(**inputs.backbone_config)
    check_head_type(cfg.head.type, backbone, cfg.extract.train_views)
    shapes = inputs.features.shapes()
    check_views_budget(cfg.extract.train_views, cfg.head.max_memory_gb, shapes)
    if not needs_streaming(shapes, cfg.head.max_memory_gb):
        return _run_in_memory(cfg, device, inputs, backbone, t0)
    if cfg.head.type in PROBE_TYPES:
        raise PipelineError(stream_message("head", float32_nbytes(shapes), cfg.head.max_memory_gb,
                                           f"head.type '{cfg.head.type}' needs the features in memory: raise "
                                           "head.max_memory_gb, or use head.type=linear (streamed)"))
    with inputs.stream() as reader:
        return _run_streamed(cfg, device, inputs, backbone, reader, float32_nbytes(shapes), t0)


def _build(cfg: Config, inputs: StageFeatures, backbone: BackboneConfig, feature_dim: int,
           num_classes: int) -> nn.Module:
    spec = None
    if cfg.head.type == "classifier":
        from pipeline.backbones import spec_from_dict

        spec = spec_from_dict(inputs.features.backbone)
    return build_head(cfg.head.type, backbone, spec, inputs.seed, feature_dim, num_classes)


def _run_in_memory(cfg: Config, device: torch.device, inputs: StageFeatures, backbone: BackboneConfig,
                   t0: float) -> dict:
    features = inputs.load()
    train_x, train_y = to_tensors(features.train)
    val_x, val_y = to_tensors(features.val)
    num_classes = len(features.classes)
    val_batches = TensorBatches(val_x, val_y, EVAL_BATCH, shuffle=False)
    bank = None if cfg.head.type in PROBE_TYPES else inputs.views(cfg.extract.train_views)  # built if missing
    t1 = time.perf_counter()
    if cfg.head.type in PROBE_TYPES:
        fitted = fitted_probe(train_probe(train_x, train_y, val_x, val_y, num_classes, cfg.head, device,
                                          cfg.run.seed), val_x)
    else:
        head = _build(cfg, inputs, backbone, features.feature_dim, num_classes)
        views = torch.from_numpy(bank.views.astype(np.float32, copy=False)) if bank else None
        if cfg.head.type == "linear" and views is None:
            result = train_linear_batched(train_x, train_y, val_x, val_y, num_classes, cfg.head, device,
                                          cfg.run.seed, inputs.seed)
        else:
            result = train_head(train_x, train_y, val_x, val_y, num_classes, cfg.head, device, cfg.run.seed,
                                head=head, train_views=views)
        fitted = fitted_module(head, result, val_batches, device)
    train_seconds = time.perf_counter() - t1
    data = HeadData(features.classes, features.feature_dim, val_batches, features.val.labels, features.val.paths,
                    {"streamed": False}, test_split(features))
    return _save_and_report(cfg, device, inputs, backbone, fitted, data, train_seconds, t0)


def _run_streamed(cfg: Config, device: torch.device, inputs: StageFeatures, backbone: BackboneConfig,
                  reader: fc.FeatureReader, nbytes: int, t0: float) -> dict:
    train_batches, val_batches = streamed_batches(reader, cfg.head.batch_size, cfg.head.max_memory_gb, cfg.run.seed)
    mix = (f", each fill drawn from {train_batches.mix_chunks} random chunks" if train_batches.mixing else "")
    print(stream_message("head", nbytes, cfg.head.max_memory_gb,
                         f"streaming from {reader.path} in chunks of {reader.train.chunk_rows} rows (buffer "
                         f"{size_text(train_batches.nbytes)} for train, {size_text(val_batches.nbytes)} "
                         f"for val{mix})"))
    head = _build(cfg, inputs, backbone, reader.feature_dim, len(reader.classes))
    weight = loss_weights(torch.from_numpy(np.asarray(reader.train.labels)), len(reader.classes),
                          cfg.head.class_weight)
    t1 = time.perf_counter()
    result = fit_head(head, train_batches, val_batches, cfg.head, device, cfg.run.seed, weight)
    train_seconds = time.perf_counter() - t1
    info = {"streamed": True, "buffer_mib": round((train_batches.nbytes + val_batches.nbytes) / MIB, 1),
            "buffer_rows": train_batches.rows, "chunk_rows": reader.train.chunk_rows,
            "chunk_reads_per_epoch": train_batches.chunk_reads}
    fitted = fitted_module(head, result, val_batches, device)
    data = HeadData(reader.classes, reader.feature_dim, val_batches, reader.val.labels, reader.val.paths, info,
                    test_scores=streamed_test(head, reader, cfg.head.max_memory_gb, device))
    return _save_and_report(cfg, device, inputs, backbone, fitted, data, train_seconds, t0)


def streamed_test(head: nn.Module, reader: fc.FeatureReader, max_memory_gb: float,
                  device: torch.device) -> Optional[dict]:
    """The kept head (its best epoch, already loaded) scored once on the cache's test split, streamed in
    file order within the val share of head.max_memory_gb; None when the cache has no test rows."""
    if reader.test is None or not reader.test.n_rows:
        return None
    batches = StreamBatches(reader.test, EVAL_BATCH, int(budget_bytes(max_memory_gb) * VAL_SHARE), shuffle=False)
    logits, targets = predict(head, batches, device)
    return score_test_probs("head", targets.numpy(), torch.softmax(logits, 1).numpy(), BEST_EPOCH)


def streamed_batches(reader: fc.FeatureReader, batch_size: int, max_memory_gb: float,
                     seed: int) -> tuple[StreamBatches, StreamBatches]:
    """(train, val) batches streamed from an open cache within head.max_memory_gb: shuffled train
    batches from a buffer of stream.TRAIN_SHARE of the budget, val in order through VAL_SHARE."""
    budget = budget_bytes(max_memory_gb)
    return (StreamBatches(reader.train, batch_size, int(budget * TRAIN_SHARE), shuffle=True, seed=seed),
            StreamBatches(reader.val, EVAL_BATCH, int(budget * VAL_SHARE), shuffle=False))


def head_params(cfg: HeadConfig) -> dict:
    """The head.* values that shape this head type, for the ledger (those that differ from the defaults)."""
    kind = cfg.type if cfg.type in CONFIGS else "linear"
    return compact_params(head_values(cfg, kind), dataclasses.asdict(CONFIGS[kind]()))


def _save_and_report(cfg: Config, device: torch.device, inputs: StageFeatures, backbone: BackboneConfig,
                     fitted: FittedHead, data: HeadData, train_seconds: float, t0: float) -> dict:
    """Stage head.pt, its reports, val predictions and metrics entry, and publish them as one unit
    (pipeline/rundir.py); then a line in the ledger."""
    artifact = ModelArtifact(
        "head", list(data.classes), fitted.weights, dataclasses.asdict(cfg.head), inputs.features.backbone,
        backbone.recorded(), inputs.seed, inputs.data_root, data.feature_dim, inputs.features.key,
        str(inputs.features.path), fitted.history, environment_info(device),
        {"head_type": cfg.head.type, "best_epoch": fitted.best_epoch, "val_acc": fitted.best_acc,
         "streamed": data.info["streamed"]}).to_dict()
    chosen_on = BEST_EPOCH if fitted.best_epoch is not None else "nothing (no training choices)"
    test = data.test_scores if data.test_scores is not None else score_test("head", data, fitted.proba, chosen_on)
    with Publication(cfg.run_dir, "head") as pub:
        pub.save_model(HEAD_FILE, lambda tmp: torch.save(artifact, tmp))
        entry = _report(cfg, inputs, fitted, data, train_seconds, t0, artifact, pub, test)
        pub.commit(metrics_entry=entry, config=cfg.to_dict())
    record_heads(cfg.run.output_dir, [ledger_entry(inputs.features, cfg.head.type, head_params(cfg.head),
                                                   entry["val_acc"], entry["mean_per_class_acc"], test,
                                                   entry["seconds"], cfg.run_dir, "head")])
    return entry


def _report(cfg: Config, inputs: StageFeatures, fitted: FittedHead, data: HeadData, train_seconds: float,
            t0: float, artifact: dict, pub: Publication, test: dict) -> dict:
    """Print the result, stage the reports and val predictions; the metrics entry (full precision)."""
    path = cfg.run_dir / HEAD_FILE
    seconds = inputs.elapsed(t0)
    trained = {"best_epoch": fitted.best_epoch, "epochs": cfg.head.epochs} if fitted.best_epoch is not None else {}
    entry = StageResult("head", fitted.best_acc, seconds, str(path), fitted.history,
                        {"train_seconds": train_seconds, **trained, "head_type": cfg.head.type,
                         "train_views": cfg.extract.train_views, **data.info, **test}).to_dict()
    preds = Predictions(fitted.val_probs, data.val_labels, data.val_paths, inputs.images, list(data.classes))
    entry.update(finish_stage(cfg.report, "head", preds, artifact, pub, history=fitted.history))
    entry.update(stage_error_analysis(pub, "head", preds))
    entry["leaked_images"] = inputs.leaked_images  # warned once per run, counted by every stage
    at = f" at epoch {fitted.best_epoch}/{cfg.head.epochs}" if fitted.best_epoch is not None else ""
    shown = f"; test top-1 {test['test_acc']:.4f}" if test.get("test_acc") is not None else ""
    print(f"head: best val_acc {fitted.best_acc:.4f}{at} ({cfg.head.type}), mean per-class "
          f"{entry['mean_per_class_acc']:.4f}{shown} ({train_seconds:.2f} s of training) -> {path}; "
          f"{confused_text(entry['confused_pairs'])}")
    return entry
