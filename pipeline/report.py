"""Stage `report`: confusion matrix, per-class report, training curves and a prediction grid per model.

The training stages call `finish_stage` with their val predictions; `run_report` rebuilds the same
files later from the saved artifacts (head.pt, logistic.joblib, finetune.pt) without retraining, and a
sweep's sweep.png from its sweep.json while the head is that sweep's winner.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from pipeline import PipelineError
from pipeline import cache as fc
from pipeline.artifacts import MODEL_FILES
from pipeline.config import Config, DataConfig, ReportConfig
from pipeline.metrics import mean_per_class_accuracy, per_class_accuracy, read_metrics, write_json
from pipeline.records import ModelArtifact, StageResult
from pipeline.rundir import Publication

REPORT_DIR = "reports"
SPLIT_KEYS = ("val_dir", "val_fraction", "test_fraction", "split_seed")  # data.* that decide val and test
READ_BYTES = 64 * 2 ** 20   # cached features read at a time for the reports (the whole cache may not fit)


@dataclass
class Predictions:
    """A model's class probabilities on the val images, in cache / folder order."""

    probs: np.ndarray      # (n_samples, num_classes)
    targets: np.ndarray    # (n_samples,) int
    paths: list[str]       # relative to root
    root: Optional[Path]   # None: no image tree (features.file), the grid shows placeholders
    classes: list[str]

    @property
    def predicted(self) -> np.ndarray:  # (n_samples,)
        return self.probs.argmax(1)


def summarise(preds: Predictions) -> dict:
    """Top-1 accuracy, mean per-class accuracy and each class's accuracy, for metrics.json."""
    y, p = np.asarray(preds.targets), preds.predicted
    per_class = per_class_accuracy(y, p, len(preds.classes))
    return {"val_acc_top1": float(np.mean(y == p)),  # full precision: rounded only where shown
            "mean_per_class_acc": mean_per_class_accuracy(y, p, len(preds.classes)),
            "per_class_acc": dict(zip(preds.classes, per_class))}


# ----------------------------------------------------------------------------- files
def report_paths(run_dir: Path, kind: str) -> dict[str, Path]:
    folder = Path(run_dir) / REPORT_DIR
    return {"confusion_matrix": folder / f"{kind}_confusion_matrix.png",
            "classification_report": folder / f"{kind}_classification_report.txt",
            "classification_report_json": folder / f"{kind}_classification_report.json",
            "training_curves": folder / f"{kind}_training_curves.png",
            "cv_scores": folder / f"{kind}_cv_scores.png",
            "predictions": folder / f"{kind}_predictions.png"}


def classification_report_dict(preds: Predictions) -> dict:
    """Per-class precision / recall / F1 / support (scikit-learn's shape), plus the accuracies of `summarise`."""
    from pipeline.class_report import classification_report

    return {**classification_report(preds.targets, preds.predicted, preds.classes), **summarise(preds)}


def _classification_report_text(preds: Predictions, title: str) -> str:
    from pipeline.class_report import classification_report, report_text

    s = summarise(preds)
    text = report_text(classification_report(preds.targets, preds.predicted, preds.classes), preds.classes)
    return (f"{title}\n\n{text}\ntop-1 accuracy        {s['val_acc_top1']:.4f}\n"
            f"mean per-class acc    {s['mean_per_class_acc']:.4f}\n")


def _thumbnail(root: Optional[Path], rel: str):
    """The image as a thumbnail of the grid's tile size; a grey tile when it went away since, or when there
    is no image tree."""
    from PIL import Image

    from pipeline.plots import TILE

    if root is not None:
        try:
            img = _jpeg_thumbnail(root / rel, TILE)
            if img is None:
                from pipeline.data import load_image

                img = load_image(root / rel)
            img.thumbnail((TILE, TILE))
            return img
        except (OSError, ValueError, SyntaxError):
            pass
    return Image.new("RGB", (TILE, TILE), (200, 200, 200))


def _jpeg_thumbnail(path: Path, size: int):
    """A JPEG decoded at the smallest of 1/1, 1/2, 1/4 or 1/8 scale that still covers size x size pixels
    (a 12-megapixel photo: a tenth of a full decode), EXIF orientation applied, as RGB; None for other
    formats, which data.load_image reads (16-bit and palette images need its conversions)."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        if img.format != "JPEG":
            return None
        img.draft("RGB", (size, size))
        return ImageOps.exif_transpose(img).convert("RGB")


def _grid(preds: Predictions, n: int, path: Path, title: str) -> Path:
    from pipeline.plots import grid_indices, plot_prediction_grid

    confidence = preds.probs.max(1)
    idx = grid_indices(preds.targets, preds.predicted, confidence, n)
    images = [_thumbnail(preds.root, preds.paths[i]) for i in idx]
    wrong = int(np.sum(preds.targets != preds.predicted))
    s = summarise(preds)
    return plot_prediction_grid(images, [preds.classes[preds.targets[i]] for i in idx],
                                [preds.classes[preds.predicted[i]] for i in idx],
                                [float(confidence[i]) for i in idx], path,
                                f"{title}: {wrong} of {len(preds.targets)} val images misclassified, val top-1 "
                                f"{s['val_acc_top1']:.3f}, mean per-class {s['mean_per_class_acc']:.3f} "
                                f"(mistakes first, most confident first, in red)", [preds.paths[i] for i in idx])


def write_reports(run_dir: Path, kind: str, preds: Predictions, cfg: ReportConfig, title: str,
                  history: Optional[Sequence[dict]] = None, cv: Optional[dict] = None) -> list[Path]:
    """Write the report files of one model; return their paths.

    history: per-epoch dicts (epoch, lr, train/val loss and acc); cv: {"best_C": c, "results": [...]}.
    """
    from pipeline.plots import plot_confusion_matrix, plot_cv_scores, plot_training_curves

    paths = report_paths(run_dir, kind)
    written = [plot_confusion_matrix(preds.targets, preds.predicted, preds.classes, paths["confusion_matrix"],
                                     f"{title}: confusion matrix on val")]
    paths["classification_report"].write_text(_classification_report_text(preds, title), encoding="utf-8")
    write_json(paths["classification_report_json"], classification_report_dict(preds))
    written += [paths["classification_report"], paths["classification_report_json"]]
    if history:
        written.append(plot_training_curves(history, paths["training_curves"], f"{title}: training curves"))
    if cv:
        selection = cv.get("selection", "cross-validation")
        label = ("cv accuracy (mean ± std over folds)" if "cross-validation" in selection
                 else "accuracy on the held-out rows")
        written.append(plot_cv_scores(cv["results"], cv["best_C"], paths["cv_scores"],
                                      f"{title}: C chosen by {selection}", label))
    written.append(_grid(preds, cfg.grid_images, paths["predictions"], title))
    return written


def model_title(kind: str, artifact: dict) -> str:
    name = artifact["backbone_config"]["name"]
    if kind == "head":
        cut = artifact["backbone_config"].get("cut", "pool")
        return f"{name} + {artifact.get('head_type', 'linear')} head on cached {cut} features"
    if kind == "logistic":
        if artifact.get("estimator") == "SGDClassifier":
            return f"{name} + logistic regression (out-of-core SGD, one-vs-rest) on cached features"
        return f"{name} + logistic regression on cached features"
    return f"{name} finetuned"


def finish_stage(settings: ReportConfig, kind: str, preds: Predictions, artifact: dict, publication: Publication,
                 history: Optional[Sequence[dict]] = None, cv: Optional[dict] = None) -> dict:
    """What a training stage adds to its metrics entry: accuracies, and the report files if enabled.

    settings: the report section; publication: the stage's rundir.Publication, in which the reports are
    staged and published with the model.
    """
    summary = summarise(preds)
    if settings.enabled:
        files = write_reports(publication.staging, kind, preds, settings, model_title(kind, artifact), history, cv)
        summary["reports"] = [str(publication.final_path(p)) for p in files]
    return summary


# ----------------------------------------------------------------------------- from artifacts
@torch.inference_mode()
def probs_over_images(predictor, root: Path, split, batch_size: int, num_workers: int) -> np.ndarray:
    """(n_samples, num_classes) probabilities for split's images (a data.Split), in order."""
    from torch.utils.data import DataLoader

    from pipeline.data import ImageListDataset, eval_transform

    dataset = ImageListDataset(root, split, eval_transform(predictor.preprocess))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return np.concatenate([predictor.probs_from_images(x) for x, _ in loader])


def cached_probs(predictor, split: fc.SplitReader) -> np.ndarray:
    """(n_samples, num_classes) probabilities from a split's cached features, read READ_BYTES at a time."""
    rows = max(1, READ_BYTES // (4 * split.feature_dim))
    buffer = np.empty((min(rows, split.n_rows), split.feature_dim), dtype=np.float32)
    probs = [predictor.probs_from_features(split.read_rows(start, min(start + rows, split.n_rows), buffer))
             for start in range(0, split.n_rows, rows)]
    return np.concatenate(probs) if probs else np.zeros((0, len(predictor.classes)))


def val_predictions(run_dir: Path, kind: str, device: torch.device, batch_size: int = 64,
                    num_workers: int = 0, trust: bool = False, features_file: Optional[str] = None,
                    data: Optional[DataConfig] = None) -> Predictions:
    """Predictions of run_dir's saved `kind` model on val: from the cache when it still holds the
    features the model was trained on, else by running the model on the val images.

    features_file: read the cached features from this file instead of the one the model records, and
    never fall back to the images (features.file: no image tree).
    data: this run's data.* (a val_dir or val_fraction split of the images; see model_data_config).
    """
    from pipeline.predictor import load_artifact, model_path, predictor_from_artifact

    artifact = load_artifact(run_dir, kind, trust)
    if "data_root" not in artifact:
        raise PipelineError(f"{model_path(run_dir, kind)} does not record its data folder (an older version "
                            f"wrote it): run the {kind} stage again to get its reports")
    classes = list(artifact["classes"])
    root = None if features_file else Path(artifact["data_root"])
    if kind in ("head", "logistic"):
        try:
            predictor = predictor_from_artifact(kind, artifact, device, with_backbone=False)
            tap = artifact["backbone"].get("tap", "pool")  # the cached tap it was trained on (head.tap)
            with fc.open_features(features_file or artifact["cache_file"], artifact["cache_key"], tap) as cache:
                return Predictions(cached_probs(predictor, cache.val), cache.val.labels, cache.val.paths, root,
                                   classes)
        except fc.CacheError as e:
            if features_file:
                raise fc.CacheError(f"report: {kind}: features.file does not hold the features "
                                    f"{model_path(run_dir, kind).name} was trained on: {e}") from None
            print(f"report: {kind}: the cached val features are not usable ({e}); running the backbone "
                  "over the val images instead")
    if features_file:
        raise PipelineError(f"report: the {kind} model needs the images (it does not train from the cache); "
                            "unset features.file, or leave it out of the run folder")
    return _predictions_from_images(run_dir, kind, artifact, device, batch_size, num_workers, data)


def data_split(data: DataConfig) -> dict:
    """The data.* keys that decide which images are val (and test): what `report` needs to find them again."""
    return {k: getattr(data, k) for k in SPLIT_KEYS}


def model_data_config(artifact: dict, data: Optional[DataConfig]) -> DataConfig:
    """The data.* that split the model's images: its data root, and the val folder / val_fraction split it
    was trained with (recorded by finetune as data_split; otherwise this run's data.* settings)."""
    split = artifact.get("data_split") or (data_split(data) if data else {})
    return dataclasses.replace(data or DataConfig(), root=str(artifact["data_root"]),
                               **{k: v for k, v in split.items() if k in SPLIT_KEYS})


def _predictions_from_images(run_dir: Path, kind: str, artifact: dict, device: torch.device, batch_size: int,
                             num_workers: int, data_cfg: Optional[DataConfig] = None) -> Predictions:
    from pipeline.data import load_dataset
    from pipeline.predictor import model_path, predictor_from_artifact

    classes, root = list(artifact["classes"]), Path(artifact["data_root"])
    data = load_dataset(model_data_config(artifact, data_cfg))
    if list(data.classes) != classes:
        raise PipelineError(f"the classes in '{root}' ({', '.join(data.classes)}) are not the ones "
                            f"{model_path(run_dir, kind).name} was trained on ({', '.join(classes)})")
    predictor = predictor_from_artifact(kind, artifact, device)
    probs = probs_over_images(predictor, root, data.val, batch_size, num_workers)
    return Predictions(probs, np.asarray(data.val.labels), list(data.val.paths), root, classes)


def run_report(cfg: Config, device: torch.device) -> dict:
    """Regenerate the reports of every model saved in the run folder (with features.file: the cached ones,
    from that file alone), and sweep.png when the head is a sweep's winner."""
    from pipeline.predictor import load_artifact, model_path

    kinds = [k for k in MODEL_FILES if model_path(cfg.run_dir, k).is_file()]
    if cfg.features.file:
        kinds = [k for k in kinds if k != "finetune"]  # finetune reads images, not features
    if not kinds:
        subs = sorted({p.parent.name for k in MODEL_FILES for p in cfg.run_dir.glob(f"*/{MODEL_FILES[k]}")})
        name = cfg.run.name or cfg.run_dir.name
        hint = f" (its benchmark sub-folders have models: --set run.name={name}/{subs[0]})" if subs else ""
        raise PipelineError(f"no trained model in '{cfg.run_dir}' (looked for {', '.join(MODEL_FILES.values())}): "
                            f"run head, logistic or finetune first, or set run.name to the run folder{hint}")
    metrics = read_metrics(cfg.run_dir)
    out = {}
    # Staged and published as one unit: a kill leaves the old reports or the new ones, never a torn PNG.
    with Publication(cfg.run_dir, "report", report_prefix="") as pub:
        for kind in kinds:
            artifact = load_artifact(cfg.run_dir, kind, cfg.run.trust_artifacts)
            preds = val_predictions(cfg.run_dir, kind, device, cfg.extract.batch_size, cfg.data.num_workers,
                                    cfg.run.trust_artifacts, cfg.features.file, cfg.data)
            # typed readers: a version this tool cannot read fails naming metrics.json or the model file
            entry = StageResult.from_dict(kind, metrics[kind], f"'{cfg.run_dir / 'metrics.json'}'") \
                if kind in metrics else None
            model = ModelArtifact.from_dict(artifact, f"'{model_path(cfg.run_dir, kind)}'", kind)
            history = (entry.history if entry else None) or model.history
            cv = (entry.details.get("cv") if entry else None) or model.extra.get("cv")
            files = write_reports(pub.staging, kind, preds, cfg.report, model_title(kind, artifact), history, cv)
            out[kind] = {**summarise(preds), "reports": [str(pub.final_path(p)) for p in files]}
            print(f"report: {kind}: val top-1 {out[kind]['val_acc_top1']:.4f}, mean per-class "
                  f"{out[kind]['mean_per_class_acc']:.4f}; {len(files)} files in {cfg.run_dir / REPORT_DIR}")
        chart = _redraw_sweep_chart(cfg.run_dir, pub, metrics)
        if chart is not None:            # head.sweep.files lists what the sweep wrote; this, what report redrew
            out["sweep"] = {"reports": [str(chart)]}
        write_json(pub.staging / REPORT_DIR / "summary.json", out)
        pub.commit()
    return out


def _redraw_sweep_chart(run_dir: Path, pub: Publication, metrics: dict) -> Optional[Path]:
    """Stage sweep.png again from the run folder's sweep.json while the run's head is that sweep's winner
    (returns where it is published, or None); a sweep.json this version cannot read is named and left
    alone, the other reports still published."""
    from pipeline.sweep import SWEEP_JSON, SWEEP_PNG

    path = run_dir / SWEEP_JSON
    if not path.is_file():
        return None
    if (metrics.get("head") or {}).get("source") != "sweep":
        print(f"report: {path} is an earlier sweep's (head.pt was trained since): {SWEEP_PNG} is not redrawn")
        return None
    from pipeline.sweep_report import outcome_from_summary, plot_sweep

    try:
        outcome = outcome_from_summary(json.loads(path.read_text(encoding="utf-8")))
        if not outcome.results:
            return None
        plot_sweep(outcome, pub.staging / SWEEP_PNG)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        (pub.staging / SWEEP_PNG).unlink(missing_ok=True)
        print(f"report: {path} cannot be read ({type(e).__name__}: {e}); {SWEEP_PNG} is not redrawn (run sweep "
              "again to rewrite both)")
        return None
    print(f"report: sweep: {len(outcome.results)} configurations drawn in {run_dir / SWEEP_PNG}")
    return run_dir / SWEEP_PNG
