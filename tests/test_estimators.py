"""The probes as scikit-learn estimators: GridSearchCV, Pipeline, clone, labels of any kind."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.estimators import KNNHead, LinearHead, MLPHead, NCMHead, make_estimator
from pipeline.probes import ProbeError, build_probe


def blobs(n_per_class=12, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (3, 4))
    y = np.repeat(np.array(["cat", "dog", "eel"]), n_per_class)
    X = centres[np.searchsorted(["cat", "dog", "eel"], y)] + rng.normal(0, 0.4, (len(y), 4))
    return X.astype(np.float32), y


def test_grid_search_over_a_linear_head():
    X, y = blobs()
    search = GridSearchCV(LinearHead(epochs=3, batch_size=8), {"lr": [1e-4, 0.05]}, cv=2).fit(X, y)
    assert search.best_params_ == {"lr": 0.05}
    assert search.best_estimator_.score(X, y) == 1.0
    assert list(search.best_estimator_.classes_) == ["cat", "dog", "eel"]


def test_pipeline_with_a_scaler_and_each_head_type():
    X, y = blobs(seed=1)
    for head in (LinearHead(epochs=4, batch_size=8, lr=0.05), MLPHead(hidden=8, epochs=4, batch_size=8, lr=0.05),
                 KNNHead(k=3), NCMHead()):
        model = Pipeline([("scale", StandardScaler()), ("head", head)]).fit(X, y)
        assert set(model.predict(X)) <= {"cat", "dog", "eel"} and model.score(X, y) == 1.0
        proba = model.predict_proba(X)
        assert proba.shape == (len(X), 3)
        np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)


def test_get_set_params_and_clone():
    head = KNNHead(k=7)
    assert head.get_params() == {"k": 7, "temperature": 0.07, "seed": 0, "device": "cpu", "verbose": False}
    assert head.set_params(k=3).k == 3
    assert clone(head).get_params() == head.get_params()
    assert set(MLPHead().get_params()) >= {"hidden", "dropout", "lr", "class_weight"}


def test_estimator_predicts_like_the_probe_with_the_same_seed():
    X, y = blobs(seed=2)
    est = LinearHead(epochs=2, seed=4).fit(X, y)
    probe = build_probe("linear", {"epochs": 2}, seed=4).fit(X, np.searchsorted(est.classes_, y))
    np.testing.assert_array_equal(est.predict_proba(X), probe.predict_proba(X))
    assert est.best_epoch_ == 2 and len(est.history_) == 2 and est.n_features_in_ == 4


def test_validation_rows_choose_the_epoch_and_must_use_known_labels():
    X, y = blobs(seed=3)
    est = LinearHead(epochs=4, lr=0.05).fit(X, y, X_val=X, y_val=y)
    assert est.best_epoch_ == 1 + [h["val_acc"] for h in est.history_].index(max(h["val_acc"] for h in est.history_))
    with pytest.raises(ProbeError, match="y_val has label 'fox'"):
        LinearHead(epochs=1).fit(X, y, X_val=X[:1], y_val=["fox"])


def test_nothing_is_printed_by_default(capsys):
    X, y = blobs(seed=4)
    LinearHead(epochs=2).fit(X, y).predict(X)
    KNNHead().fit(X, y).predict(X)
    assert capsys.readouterr() == ("", "")


def test_bad_parameters_fail_in_fit_or_make_estimator():
    X, y = blobs(seed=5)
    with pytest.raises(ProbeError, match="knn.k = 0"):
        KNNHead(k=0).fit(X, y)
    with pytest.raises(ProbeError, match="ncm has no parameter 'k'"):
        make_estimator("ncm", {"k": 3})
    assert isinstance(make_estimator("mlp", {"hidden": 4}, seed=1), MLPHead)


def _expected_failures(estimator):
    # class_weight takes none | balanced (the CLI's choices), not scikit-learn's {label: weight} dict
    if isinstance(estimator, (LinearHead, MLPHead)):
        return {"check_class_weight_classifiers": "class_weight is none or balanced, not a dict"}
    return {}


try:
    from sklearn.utils.estimator_checks import parametrize_with_checks

    _checks = parametrize_with_checks([NCMHead(), KNNHead(k=3), LinearHead(epochs=1, batch_size=64, lr=0.1),
                                       MLPHead(hidden=16, epochs=5, batch_size=32, lr=0.1)],
                                      expected_failed_checks=_expected_failures)
except TypeError:   # scikit-learn < 1.6 has no expected_failed_checks
    _checks = pytest.mark.skip(reason="needs scikit-learn >= 1.6")


@_checks
def test_scikit_learns_estimator_checks(estimator, check):
    check(estimator)
