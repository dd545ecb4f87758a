"""Stage `logistic`: a scikit-learn logistic-regression baseline on the cached features.

In memory: StandardScaler + LogisticRegression, C chosen by stratified k-fold cross-validation.
When the features exceed head.max_memory_gb it runs out of core instead (`fit_logistic_streamed`):
StandardScaler.partial_fit over one pass, then SGDClassifier(loss="log_loss").partial_fit over
shuffled buffers streamed from the cache, C chosen on a held-out part of train.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from types import SimpleNamespace
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from pipeline import PipelineError
from pipeline import cache as fc
from pipeline.artifacts import MODEL_FILES
from pipeline.config import Config, LogisticConfig
from pipeline.head_outputs import confused_text, ledger_entry, record_heads, stage_error_analysis, test_split
from pipeline.logistic_worker import class_proba
from pipeline.orchestrate import StageFeatures, stage_features
from pipeline.records import ModelArtifact, StageResult
from pipeline.report import Predictions, finish_stage
from pipeline.rundir import Publication
from pipeline.runtime import environment_info
from pipeline.selection import score_test
from pipeline.stream import MIB, TRAIN_SHARE, StreamBatches, budget_bytes, float32_nbytes, needs_streaming, \
    stream_message

LOGISTIC_FILE = MODEL_FILES["logistic"]
SGD_BATCH = 2048    # rows per partial_fit call, at most
SGD_ETA0 = 4.0      # first step size on rows of mean squared norm 1: 1/L of the logistic loss


def _folds(y: np.ndarray, cv_folds: int, classes: Sequence[str] = ()) -> int:
    counts = np.bincount(y)
    smallest = int(counts.argmin())
    folds = min(cv_folds, int(counts[smallest]))
    if folds < 2:
        name = f"'{classes[smallest]}'" if smallest < len(classes) else f"number {smallest}"
        raise PipelineError(f"logistic: class {name} has {int(counts[smallest])} training image(s); "
                            "cross-validation needs at least 2 per class: add images to it")
    return folds


def fit_logistic(x: np.ndarray, y: np.ndarray, cfg: LogisticConfig, seed: int,
                 classes: Sequence[str] = ()) -> GridSearchCV:
    """Standardise, then choose C by stratified k-fold cross-validation on train and refit on all of it.

    x : ndarray of shape (n_samples, n_features); y : ndarray of shape (n_samples,)
    The (C, fold) fits run side by side on the cores the process may use, each with one BLAS thread:
    BLAS threads spin while they wait, and on a machine other jobs were using the default threads made
    the same search 38 times slower (107 s against 2.8 s on the digits demo's features, load average 9
    on 2 cores; benchmarks/logistic_search.py). The fits and the result are GridSearchCV's own.
    """
    from joblib import parallel_backend
    from threadpoolctl import threadpool_limits

    from pipeline.runtime import available_cores

    folds = _folds(y, cfg.cv_folds, classes)
    model = Pipeline([("scale", StandardScaler()),
                      ("clf", LogisticRegression(max_iter=cfg.max_iter))])
    search = GridSearchCV(model, {"clf__C": list(cfg.c_grid)},
                          cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed),
                          scoring="accuracy", refit=True, n_jobs=available_cores())
    with threadpool_limits(1), parallel_backend("threading"):  # threads: no copies of x, no process start
        return search.fit(x, y)


def cv_summary(search: GridSearchCV) -> dict:
    """The chosen C and the cross-validated accuracy (mean, std over folds) of every C tried."""
    res = search.cv_results_
    return {"best_C": float(search.best_params_["clf__C"]),
            "selection": f"{search.n_splits_}-fold cross-validation",
            "results": [{"C": float(p["clf__C"]), "mean": float(m), "std": float(s)}
                        for p, m, s in zip(res["params"], res["mean_test_score"], res["std_test_score"])]}


# ----------------------------------------------------------------------------- out of core
@dataclass
class StreamedLogistic:
    """The out-of-core fit: the model, the C chosen on held-out rows, and what it cost."""

    model: Pipeline                       # scale -> unit_norm -> SGDClassifier
    best_c: float
    held_out: list[dict]                  # per C of the grid: C, acc (last epoch), history (per epoch)
    held_out_rows: int
    passes: int                           # reads of the whole train split
    buffer_bytes: int
    chunk_reads: int = 0                  # HDF5 chunks read in all, over every pass
    cv: dict = field(default_factory=dict)


def held_out_mask(y: np.ndarray, cv_folds: int, seed: int) -> np.ndarray:
    """(n_samples,) bool: about 1/cv_folds of the rows of every class, chosen with the seed.

    Rows, not whole HDF5 chunks: rows are class-sorted, so held-out chunks would hold out whole classes.
    """
    folds = _folds(y, cv_folds)
    _, held = next(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    mask = np.zeros(len(y), dtype=bool)
    mask[held] = True
    return mask


def _sgd(alpha: float, n_rows: int, epochs: int, seed: int) -> SGDClassifier:
    # learning_rate "constant" with eta0 set before every pass: a linear decay over the passes (sklearn's
    # default "optimal" schedule assumes rows of norm ~1 and starts far too large on standardised features);
    # the weights are averaged over the second half of the passes (tail averaging), which removes most
    # of the SGD noise without dragging in the early, far-off weights.
    start = n_rows * (epochs // 2)
    return SGDClassifier(loss="log_loss", alpha=alpha, learning_rate="constant", eta0=SGD_ETA0,
                         average=start if start > 1 else False, shuffle=False, random_state=seed)


def _eta(epoch: int, epochs: int) -> float:
    """Step size of pass epoch (0-based): SGD_ETA0 decaying linearly, SGD_ETA0 / epochs in the last pass."""
    return SGD_ETA0 * (1 - epoch / epochs)


def _fit_scaler(train: fc.SplitReader, batch: int, max_bytes: int) -> tuple[StandardScaler, FunctionTransformer]:
    """One pass of StandardScaler.partial_fit; then a constant factor giving rows a mean squared norm of 1."""
    scaler = StandardScaler()
    for x, _ in StreamBatches(train, batch, max_bytes, shuffle=False):
        scaler.partial_fit(x.numpy())
    # After standardising, the mean squared row norm is the number of non-constant features.
    norm2 = float(np.sum(scaler.var_ / scaler.scale_ ** 2))
    unit = FunctionTransformer(functools.partial(np.multiply, 1.0 / math.sqrt(max(norm2, 1.0))))
    return scaler, unit.fit(np.zeros((1, len(scaler.mean_)), dtype=np.float32))


def _sgd_batch(feature_dim: int, max_bytes: int) -> int:
    """Rows per partial_fit call: SGD_BATCH, or fewer so that a batch takes at most 1/128 of max_bytes,
    but at least one HDF5 chunk's rows (the buffer holds one anyway; each call has a fixed cost).

    scikit-learn makes several float64 copies of every batch; measured with a 0.5 GiB budget on 400,000
    rows, peak RSS above the imports was 488 MiB with 2048-row batches, 405 with 1024, 300 with 512
    (the buffer is 192 MiB of it); 512-row calls are 20 % slower than 2048-row ones.
    """
    return int(max(fc.ROW_CHUNK, min(SGD_BATCH, max_bytes // 128 // (4 * feature_dim))))


def _prepare_(x: np.ndarray, scaler: StandardScaler, unit: FunctionTransformer) -> np.ndarray:
    """scaler then unit_norm, in place on a batch the caller owns (Pipeline.transform would make two copies)."""
    x -= scaler.mean_.astype(x.dtype)
    x *= (unit.func.args[0] / scaler.scale_).astype(x.dtype)
    return x


def fit_logistic_streamed(train: fc.SplitReader, cfg: LogisticConfig, seed: int, max_bytes: int) -> StreamedLogistic:
    """Out-of-core logistic regression on a split streamed from the cache.

    1. StandardScaler.partial_fit over one pass, and a constant factor that gives rows a mean squared
       norm of 1, so the step size needs no tuning (SGD_ETA0 = 1/L of the logistic loss);
    2. one SGDClassifier(loss="log_loss") per C of logistic.c_grid, all fed from the same buffers
       (one read serves every C), for logistic.sgd_epochs passes over the rows not held out (about
       1/cv_folds of every class is held out); alpha = factor^2 / (C * n_rows), so that C means what it
       means to LogisticRegression; each C is scored on the held-out rows during every pass;
    3. the C with the best held-out accuracy in the last pass is refit on all rows, sgd_epochs passes.
    The step size decays linearly over the passes and the weights are averaged over the second half
    of them. max_bytes bounds the buffer (stream.TRAIN_SHARE of it) and the per-call batches (1/128 each).
    """
    y_all = train.labels
    classes = np.unique(y_all)
    held = held_out_mask(y_all, cfg.cv_folds, seed)
    batch = _sgd_batch(train.feature_dim, max_bytes)
    scaler, unit = _fit_scaler(train, batch, int(max_bytes * TRAIN_SHARE))
    factor2 = unit.func.args[0] ** 2
    batches = StreamBatches(train, batch, int(max_bytes * TRAIN_SHARE), shuffle=True, seed=seed)
    n_fit = int((~held).sum())
    grid = [_sgd(factor2 / (c * n_fit), n_fit, cfg.sgd_epochs, seed) for c in cfg.c_grid]
    history: list[list[float]] = [[] for _ in grid]
    chunk_reads = len(batches.chunks)  # the scaler's pass
    for epoch in range(cfg.sgd_epochs):
        for m in grid:
            m.set_params(eta0=_eta(epoch, cfg.sgd_epochs))
        correct, scored = np.zeros(len(grid)), 0
        for x, y, rows in batches.iter_rows():
            xt, y, h = _prepare_(x.numpy(), scaler, unit), y.numpy(), held[rows.numpy()]
            if (~h).any():
                for m in grid:
                    m.partial_fit(xt[~h], y[~h], classes=classes)
            if h.any() and hasattr(grid[0], "coef_"):
                correct += [np.sum(m.predict(xt[h]) == y[h]) for m in grid]
                scored += int(h.sum())
        chunk_reads += batches.chunk_reads
        for i in range(len(grid)):
            history[i].append(float(correct[i] / max(scored, 1)))
    best = int(np.argmax([h[-1] for h in history]))  # the first of equals, as GridSearchCV
    best_c = float(cfg.c_grid[best])
    final = _sgd(factor2 / (best_c * len(y_all)), len(y_all), cfg.sgd_epochs, seed)
    for epoch in range(cfg.sgd_epochs):
        final.set_params(eta0=_eta(epoch, cfg.sgd_epochs))
        for x, y, _ in batches.iter_rows():
            final.partial_fit(_prepare_(x.numpy(), scaler, unit), y.numpy(), classes=classes)
        chunk_reads += batches.chunk_reads
    held_out = [{"C": float(c), "acc": h[-1], "history": list(h)}
                for c, h in zip(cfg.c_grid, history)]
    cv = {"best_C": best_c, "selection": f"accuracy on held-out rows (1/{_folds(y_all, cfg.cv_folds)} of train)",
          "results": [{"C": r["C"], "mean": r["acc"], "std": 0.0} for r in held_out]}
    model = Pipeline([("scale", scaler), ("unit_norm", unit), ("clf", final)])
    return StreamedLogistic(model, best_c, held_out, int(held.sum()), 1 + 2 * cfg.sgd_epochs, batches.nbytes,
                            chunk_reads, cv)


def predict_proba_streamed(model: Pipeline, split: fc.SplitReader, num_classes: int, max_bytes: int) -> np.ndarray:
    """(n_samples, num_classes) probabilities of a split read in order through a bounded buffer."""
    batch = _sgd_batch(split.feature_dim, max_bytes)
    out = np.zeros((split.n_rows, num_classes))
    for x, _, rows in StreamBatches(split, batch, int(max_bytes * TRAIN_SHARE), shuffle=False).iter_rows():
        out[rows.numpy()[:, None], model.classes_] = model.predict_proba(x.numpy())
    return out


# ----------------------------------------------------------------------------- stage
@dataclass
class LogisticFit:
    """A fitted model with its val probabilities, however it was fitted."""

    model: Pipeline
    best_c: float
    cv: dict                     # best_C, selection, results (per C: mean, std)
    cv_accuracy: float
    val_probs: np.ndarray        # (n_val, num_classes)
    val_labels: np.ndarray
    val_paths: list[str]
    classes: tuple[str, ...]
    feature_dim: int
    fit_seconds: float
    info: dict                   # for metrics.json: estimator, streamed, ...
    test: dict = field(default_factory=dict)   # test top-1 / mean per-class, scored once (in memory only)


def _fit_in_memory(lcfg: LogisticConfig, seed: int, inputs: StageFeatures) -> LogisticFit:
    features = inputs.load()
    x_train = features.train.features.astype(np.float32)
    x_val = features.val.features.astype(np.float32)
    t1 = time.perf_counter()
    search = fit_logistic(x_train, features.train.labels, lcfg, seed, features.classes)
    fit_seconds = time.perf_counter() - t1
    n = len(features.classes)
    probs = class_proba(search.best_estimator_, x_val, n, np.float64)
    cv = cv_summary(search)
    test = score_test("logistic", SimpleNamespace(test=test_split(features)),
                      lambda x: class_proba(search.best_estimator_, x, n, np.float64), f"train ({cv['selection']})")
    return LogisticFit(search.best_estimator_, float(search.best_params_["clf__C"]), cv,
                       float(search.best_score_), probs, features.val.labels, features.val.paths, features.classes,
                       features.feature_dim, fit_seconds, {"estimator": "LogisticRegression", "streamed": False}, test)


def _fit_streamed(lcfg: LogisticConfig, seed: int, max_memory_gb: float, reader: fc.FeatureReader,
                  nbytes: int) -> LogisticFit:
    budget = budget_bytes(max_memory_gb)
    passes = 2 + 2 * lcfg.sgd_epochs
    print(stream_message("logistic", nbytes, max_memory_gb,
                         f'out-of-core SGDClassifier(loss="log_loss") with partial_fit, {passes} passes over '
                         f"{reader.path} (each read feeds all {len(lcfg.c_grid)} C values of the grid)"))
    t1 = time.perf_counter()
    fit = fit_logistic_streamed(reader.train, lcfg, seed, budget)
    fit_seconds = time.perf_counter() - t1
    probs = predict_proba_streamed(fit.model, reader.val, len(reader.classes), budget)
    best_acc = next(r["acc"] for r in fit.held_out if r["C"] == fit.best_c)
    info = {"estimator": "SGDClassifier", "streamed": True, "sgd_epochs": lcfg.sgd_epochs,
            "passes": fit.passes + 1, "chunk_reads": fit.chunk_reads, "buffer_mib": round(fit.buffer_bytes / MIB, 1),
            "held_out_rows": fit.held_out_rows, "held_out": fit.held_out}
    return LogisticFit(fit.model, fit.best_c, fit.cv, best_acc, probs, reader.val.labels, reader.val.paths,
                       reader.classes, reader.feature_dim, fit_seconds, info)


def run_logistic(cfg: Config, device: torch.device) -> dict:
    """Stage `logistic`: fit on the cache from stage_features (features.file, or data.root's)."""
    t0 = time.perf_counter()
    inputs = stage_features(cfg, device)
    shapes = inputs.features.shapes()
    if not needs_streaming(shapes, cfg.head.max_memory_gb):
        return _save_and_report(cfg, device, inputs, _fit_in_memory(cfg.logistic, cfg.run.seed, inputs), t0)
    with inputs.stream() as reader:
        fit = _fit_streamed(cfg.logistic, cfg.run.seed, cfg.head.max_memory_gb, reader, float32_nbytes(shapes))
    return _save_and_report(cfg, device, inputs, fit, t0)


def _save_and_report(cfg: Config, device: torch.device, inputs: StageFeatures, fit: LogisticFit, t0: float) -> dict:
    """Stage logistic.joblib, its reports and metrics entry, and publish them as one unit (pipeline/rundir.py)."""
    val_acc = float(np.mean(fit.val_probs.argmax(1) == fit.val_labels)) if len(fit.val_labels) else 0.0
    artifact = ModelArtifact(
        "logistic", list(fit.classes), fit.model, dataclasses.asdict(cfg.logistic), inputs.features.backbone,
        inputs.backbone_config, inputs.seed, inputs.data_root, fit.feature_dim, inputs.features.key,
        str(inputs.features.path), versions=environment_info(device),
        extra={"C": fit.best_c, "cv": fit.cv, "estimator": fit.info["estimator"],
               "streamed": fit.info["streamed"]}).to_dict()
    import joblib

    with Publication(cfg.run_dir, "logistic") as pub:
        pub.save_model(LOGISTIC_FILE, lambda tmp: joblib.dump(artifact, tmp))
        entry = _report(cfg, inputs, fit, t0, val_acc, artifact, pub)
        pub.commit(metrics_entry=entry, config=cfg.to_dict())
    record_heads(cfg.run.output_dir, [ledger_entry(inputs.features, "logistic", {"C": fit.best_c}, val_acc,
                                                   entry["mean_per_class_acc"], fit.test, entry["seconds"],
                                                   cfg.run_dir, "logistic")])
    return entry


def _report(cfg: Config, inputs: StageFeatures, fit: LogisticFit, t0: float, val_acc: float, artifact: dict,
            pub: Publication) -> dict:
    """Print the result, stage the reports; the metrics entry (full precision)."""
    path = cfg.run_dir / LOGISTIC_FILE
    entry = StageResult("logistic", val_acc, inputs.elapsed(t0), str(path),
                        details={"fit_seconds": fit.fit_seconds, "C": fit.best_c,
                                 "cv_accuracy": fit.cv_accuracy, "cv": fit.cv, **fit.info, **fit.test}).to_dict()
    preds = Predictions(fit.val_probs, fit.val_labels, fit.val_paths, inputs.images, list(fit.classes))
    entry.update(finish_stage(cfg.report, "logistic", preds, artifact, pub, cv=fit.cv))
    entry.update(stage_error_analysis(pub, "logistic", preds))
    entry["leaked_images"] = inputs.leaked_images  # warned once per run, counted by every stage
    shown = f"; test top-1 {fit.test['test_acc']:.4f}" if fit.test.get("test_acc") is not None else ""
    print(f"logistic: val_acc {val_acc:.4f}, mean per-class {entry['mean_per_class_acc']:.4f}{shown} with "
          f"C={fit.best_c:g} ({fit.info['estimator']}; C chosen by {fit.cv['selection']}: {fit.cv_accuracy:.4f}; "
          f"{fit.fit_seconds:.2f} s) -> {path}; {confused_text(entry['confused_pairs'])}")
    return entry
