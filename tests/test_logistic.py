from pipeline.artifacts import load_joblib
import numpy as np
import pytest
import torch

from pipeline import PipelineError
from pipeline.config import LogisticConfig
from pipeline.logistic import fit_logistic, run_logistic
from pipeline.metrics import read_metrics


def test_cross_validation_picks_c_from_the_grid():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    x = rng.normal(size=(60, 8)) + y[:, None] * 2.0
    search = fit_logistic(x, y, LogisticConfig(c_grid=[0.001, 1.0], cv_folds=3), seed=0)
    assert search.best_params_["clf__C"] in (0.001, 1.0)
    assert len(search.cv_results_["params"]) == 2
    assert search.score(x, y) > 0.95
    assert search.best_estimator_.named_steps["scale"].mean_.shape == (8,)  # standardised


def test_one_image_class_is_a_clear_error():
    x, y = np.zeros((3, 2)), np.array([0, 0, 1])
    with pytest.raises(PipelineError, match="at least 2 per class"):
        fit_logistic(x, y, LogisticConfig(), seed=0)


def test_run_logistic_saves_model_and_metrics(tiny_cfg):
    cfg = tiny_cfg()
    entry = run_logistic(cfg, torch.device("cpu"))
    saved = load_joblib(cfg.run_dir / "logistic.joblib")
    assert saved["classes"] == ["ants", "bees"] and saved["C"] in (0.1, 1.0)
    assert entry["val_acc"] == 1.0  # colour-coded classes are separable even with random features
    assert read_metrics(cfg.run_dir)["logistic"]["C"] == entry["C"]
