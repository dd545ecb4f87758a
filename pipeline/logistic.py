"""Stage `logistic`: a scikit-learn logistic-regression baseline on the cached features."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from pipeline import PipelineError
from pipeline.artifacts import MODEL_FILES, save_joblib
from pipeline.config import Config, LogisticConfig
from pipeline.extract import load_features
from pipeline.metrics import update_metrics
from pipeline.report import Predictions, finish_stage
from pipeline.runtime import environment_info

LOGISTIC_FILE = MODEL_FILES["logistic"]


def fit_logistic(x: np.ndarray, y: np.ndarray, cfg: LogisticConfig, seed: int) -> GridSearchCV:
    """Standardise, then choose C by stratified k-fold cross-validation on train and refit on all of it.

    x : ndarray of shape (n_samples, n_features); y : ndarray of shape (n_samples,)
    """
    smallest_class = int(np.bincount(y).min())
    folds = min(cfg.cv_folds, smallest_class)
    if folds < 2:
        raise PipelineError(f"logistic: a class has {smallest_class} training image(s); cross-validation "
                            "needs at least 2 per class")
    model = Pipeline([("scale", StandardScaler()),
                      ("clf", LogisticRegression(max_iter=cfg.max_iter))])
    search = GridSearchCV(model, {"clf__C": list(cfg.c_grid)},
                          cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed),
                          scoring="accuracy", refit=True)
    return search.fit(x, y)


def cv_summary(search: GridSearchCV) -> dict:
    """The chosen C and the cross-validated accuracy (mean, std over folds) of every C tried."""
    res = search.cv_results_
    return {"best_C": float(search.best_params_["clf__C"]),
            "results": [{"C": float(p["clf__C"]), "mean": float(m), "std": float(s)}
                        for p, m, s in zip(res["params"], res["mean_test_score"], res["std_test_score"])]}


def run_logistic(cfg: Config, device: torch.device) -> dict:
    t0 = time.perf_counter()
    features, plan = load_features(cfg, device)
    x_train = features.train.features.astype(np.float32)
    x_val = features.val.features.astype(np.float32)
    t1 = time.perf_counter()
    search = fit_logistic(x_train, features.train.labels, cfg.logistic, cfg.run.seed)
    fit_seconds = time.perf_counter() - t1
    val_acc = float(search.score(x_val, features.val.labels))
    best_c = float(search.best_params_["clf__C"])
    cv = cv_summary(search)
    artifact = {"kind": "logistic", "model": search.best_estimator_, "classes": list(features.classes),
                "feature_dim": features.feature_dim, "backbone_config": dataclasses.asdict(cfg.backbone),
                "backbone": plan.spec.to_dict(), "logistic_config": dataclasses.asdict(cfg.logistic),
                "C": best_c, "cv": cv, "seed": cfg.run.seed, "cache_key": plan.key, "cache_file": str(plan.path),
                "data_root": str(plan.data.root), "versions": environment_info(device)}
    path = save_joblib(artifact, cfg.run_dir / LOGISTIC_FILE)
    entry = {"val_acc": round(val_acc, 4), "seconds": round(time.perf_counter() - t0, 3),
             "fit_seconds": round(fit_seconds, 3), "C": best_c,
             "cv_accuracy": round(float(search.best_score_), 4), "cv": cv, "model_file": str(path)}
    print(f"logistic: val_acc {val_acc:.4f} with C={best_c:g} (cv {search.best_score_:.4f}, "
          f"{fit_seconds:.2f} s) -> {path}")
    probs = search.best_estimator_.predict_proba(x_val)
    full = np.zeros((len(probs), len(features.classes)))
    full[:, search.best_estimator_.classes_] = probs
    preds = Predictions(full, features.val.labels, features.val.paths, plan.data.root, list(features.classes))
    entry.update(finish_stage(cfg, "logistic", preds, artifact, cv=cv))
    update_metrics(cfg.run_dir, "logistic", entry)
    return entry
