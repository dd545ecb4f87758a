from pipeline.artifacts import load_joblib
import numpy as np
import pytest
import torch

from pipeline import PipelineError
from pipeline import cache as fc
from pipeline.config import LogisticConfig
from pipeline.logistic import fit_logistic, fit_logistic_streamed, held_out_mask, predict_proba_streamed, run_logistic
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


# ----------------------------------------------------------------------------- out of core
def blob_cache(path, n_per_class=300, classes=4, dim=24, spread=1.0, seed=0):
    """A class-sorted cache of Gaussian blobs; returns the arrays too."""
    from tests.conftest import write_feature_cache

    centres = np.random.default_rng(123).normal(size=(classes, dim)) * spread
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in (("train", n_per_class), ("val", n_per_class)):
        y = np.repeat(np.arange(classes), n)
        data[split] = ((centres[y] + rng.normal(size=(len(y), dim)) + 5).astype(np.float32), y)
    write_feature_cache(path, data, [f"c{i}" for i in range(classes)])
    return data


def test_held_out_rows_are_a_stratified_third_of_every_class():
    y = np.repeat([0, 1, 2], [30, 60, 90])
    mask = held_out_mask(y, 3, seed=0)
    assert [int(mask[y == c].sum()) for c in range(3)] == [10, 20, 30]
    assert not np.array_equal(mask, held_out_mask(y, 3, seed=1))


def test_streamed_fit_chooses_c_on_held_out_rows_and_refits_on_all(tmp_path):
    from sklearn.linear_model import SGDClassifier

    data = blob_cache(tmp_path / "c.h5")
    cfg = LogisticConfig(c_grid=[1e-4, 1.0], cv_folds=3, sgd_epochs=4)
    with fc.open_features(tmp_path / "c.h5") as r:
        fit = fit_logistic_streamed(r.train, cfg, seed=0, max_bytes=2 ** 20)
        again = fit_logistic_streamed(r.train, cfg, seed=0, max_bytes=2 ** 20)
        probs = predict_proba_streamed(fit.model, r.val, 4, 2 ** 20)
    assert [name for name, _ in fit.model.steps] == ["scale", "unit_norm", "clf"]
    clf = fit.model.named_steps["clf"]
    assert isinstance(clf, SGDClassifier) and clf.loss == "log_loss"
    assert fit.held_out_rows == 400 and [len(h["history"]) for h in fit.held_out] == [4, 4]
    # C = 1e-4 regularises a 24-dim problem into near-constant scores: the held-out rows must reject it
    assert fit.held_out[0]["acc"] < fit.held_out[1]["acc"] and fit.best_c == 1.0
    factor = fit.model.named_steps["unit_norm"].func.args[0]
    assert clf.alpha == pytest.approx(factor ** 2 / (1.0 * 1200))  # refit on all 1200 rows, C as in LogisticRegression
    assert fit.passes == 1 + 2 * 4
    assert np.allclose(probs.sum(1), 1) and np.mean(probs.argmax(1) == data["val"][1]) > 0.95
    assert np.array_equal(again.model.named_steps["clf"].coef_, clf.coef_)  # same seed, same model


@pytest.mark.parametrize("c", [0.01, 1.0])
def test_out_of_core_sgd_reaches_in_memory_accuracy_at_the_same_c(tmp_path, c):
    """Same C, no selection: the optimiser alone (1,200 val rows, classes that overlap).

    Measured over 3 overlaps x 2 draws x 3 C values: -0.9 to +0.8 points, mean -0.06.
    """
    data = blob_cache(tmp_path / "c.h5", spread=0.45)
    cfg = LogisticConfig(c_grid=[c], cv_folds=3)
    (x, y), (vx, vy) = data["train"], data["val"]
    in_memory = fit_logistic(x, y, cfg, seed=0).score(vx, vy)
    with fc.open_features(tmp_path / "c.h5") as r:
        fit = fit_logistic_streamed(r.train, cfg, seed=0, max_bytes=2 ** 20)
        streamed = np.mean(predict_proba_streamed(fit.model, r.val, 4, 2 ** 20).argmax(1) == vy)
    assert 0.7 < in_memory < 0.9  # neither trivial nor hopeless
    assert abs(streamed - in_memory) <= 0.01


def test_run_logistic_goes_out_of_core_above_the_budget_and_says_so(tiny_cfg, capsys):
    from pipeline.predictor import load_predictor
    from pipeline.report import report_paths, run_report

    cfg = tiny_cfg("head.max_memory_gb=1e-5", "report.enabled=true")
    entry = run_logistic(cfg, torch.device("cpu"))
    out = capsys.readouterr().out
    passes = 2 + 2 * cfg.logistic.sgd_epochs  # scaler, grid, refit, val
    assert ('logistic: cache is 0.0 MiB of float32 features > head.max_memory_gb=1e-05 (0.0 MiB): out-of-core '
            f'SGDClassifier(loss="log_loss") with partial_fit, {passes} passes over') in out
    assert entry["passes"] == passes and entry["sgd_epochs"] == cfg.logistic.sgd_epochs
    assert entry["estimator"] == "SGDClassifier" and entry["streamed"] is True and entry["val_acc"] == 1.0
    assert [h["C"] for h in entry["held_out"]] == [0.1, 1.0] and entry["C"] in (0.1, 1.0)
    assert entry["cv"]["selection"] == "accuracy on held-out rows (1/2 of train)" and entry["held_out_rows"] == 6
    saved = load_joblib(cfg.run_dir / "logistic.joblib")
    assert saved["estimator"] == "SGDClassifier" and saved["C"] == entry["C"]
    assert report_paths(cfg.run_dir, "logistic")["cv_scores"].exists()
    assert run_report(cfg, torch.device("cpu"))["logistic"]["val_acc_top1"] == 1.0
    val = fc.read_cache(saved["cache_file"]).val
    probs = load_predictor(cfg.run_dir, "logistic", torch.device("cpu")).probs_from_features(val.features)
    assert probs.shape == (6, 2) and np.mean(probs.argmax(1) == val.labels) == 1.0
    assert read_metrics(cfg.run_dir)["logistic"]["estimator"] == "SGDClassifier"


def test_in_memory_logistic_records_its_estimator(tiny_cfg):
    entry = run_logistic(tiny_cfg(), torch.device("cpu"))
    assert entry["estimator"] == "LogisticRegression" and entry["streamed"] is False
    assert entry["cv"]["selection"] == "2-fold cross-validation"


def test_search_runs_one_blas_thread_per_fit(monkeypatch):
    """BLAS threads spin while they wait; under load the default threads made the search 38x slower."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_info

    seen = []
    fit = LogisticRegression.fit

    def recording_fit(self, *a, **k):
        seen.append(max((p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"), default=1))
        return fit(self, *a, **k)

    monkeypatch.setattr(LogisticRegression, "fit", recording_fit)
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 10)
    search = fit_logistic(rng.normal(size=(30, 5)) + y[:, None], y, LogisticConfig(c_grid=[0.1, 1.0]), seed=0)
    assert len(seen) == 2 * 3 + 1 and set(seen) == {1}  # every (C, fold) fit and the refit
    assert search.n_jobs >= 1


def test_too_few_images_names_the_class():
    from pipeline import PipelineError
    from pipeline.logistic import _folds

    with pytest.raises(PipelineError, match="class 'bees' has 1 training image"):
        _folds(np.array([0, 0, 0, 1]), 3, ("ants", "bees"))


def test_run_logistic_writes_val_predictions_and_a_ledger_line(tiny_cfg):
    import csv

    from pipeline.ledger import read_ledger

    cfg = tiny_cfg()
    entry = run_logistic(cfg, torch.device("cpu"))
    rows = list(csv.DictReader((cfg.run_dir / "logistic_val_predictions.csv").open()))
    assert len(rows) == 6 and all(r["correct"] == "1" for r in rows)   # val_acc 1.0 on the colour-coded classes
    assert entry["mean_per_class_acc"] == entry["val_acc_top1"] == 1.0 and entry["confused_pairs"] == []
    (line,) = read_ledger(cfg.run_dir.parent / "ledger.jsonl").entries
    assert (line.head_type, line.source, line.params, line.val_acc) == ("logistic", "logistic", {"C": entry["C"]}, 1.0)
    assert line.cache_file == read_metrics(cfg.run_dir)["extract"]["cache_file"]
