"""The probes as scikit-learn estimators, for GridSearchCV, sklearn.pipeline.Pipeline and notebooks.

    from pipeline.estimators import LinearHead, KNNHead
    GridSearchCV(LinearHead(epochs=10), {"lr": [1e-3, 1e-2]}).fit(X, y)

Constructors only store parameters (checked in fit, by pipeline.probes); learned attributes end
with ``_``: ``classes_`` (any label values), ``n_features_in_``, ``probe_`` (the fitted probe),
``best_epoch_`` and ``history_`` for the trained types. Nothing prints unless ``verbose=True``
(a progress bar over epochs). This is the only module of the head zoo that imports scikit-learn.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted

try:                                     # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:                      # older: the method it replaced
    def _validate_data(estimator, *args, **kwargs):
        return estimator._validate_data(*args, **kwargs)

from pipeline.probes import ProbeError, build_probe, check_head_type, make_config, param_names


class ProbeClassifier(ClassifierMixin, BaseEstimator):
    """Shared fit / predict of the four head types; subclasses name their parameters in __init__."""

    head_type = ""

    def _probe_params(self) -> dict:
        return {name: getattr(self, name) for name in param_names(self.head_type)}

    def fit(self, X, y, X_val=None, y_val=None) -> "ProbeClassifier":
        """X : array of shape (n_samples, n_features); y : (n_samples,) labels of any sortable kind.

        X_val, y_val : optional held-out rows; the trained types keep their best epoch on them
        (without them, the last epoch).
        """
        # scikit-learn's own checks: finite 2-D float X, 1-D class labels, n_features_in_, clear messages
        X, y = _validate_data(self, X, y, dtype=[np.float32, np.float64])
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        encoded_val = None
        if X_val is not None:
            X_val = _validate_data(self, X_val, reset=False, dtype=[np.float32, np.float64])
            encoded_val = self._encode(np.asarray(y_val), "y_val")
        probe = build_probe(self.head_type, self._probe_params(), num_classes=len(self.classes_),
                            seed=self.seed, device=self.device, progress=self.verbose)
        self.probe_ = probe.fit(X, np.searchsorted(self.classes_, y), X_val, encoded_val)
        if probe.result is not None and probe.result.history:
            self.best_epoch_, self.history_ = probe.result.best_epoch, probe.result.history
        return self

    def _encode(self, labels: np.ndarray, name: str) -> np.ndarray:
        idx = np.searchsorted(self.classes_, labels).clip(0, len(self.classes_) - 1)
        unknown = labels[self.classes_[idx] != labels]
        if len(unknown):
            raise ProbeError(f"{name} has label {unknown[0].item()!r}, which is not among the training labels")
        return idx

    def predict_proba(self, X) -> np.ndarray:
        """(n_samples, n_classes) probabilities, columns in the order of classes_."""
        check_is_fitted(self, "probe_")
        return self.probe_.predict_proba(_validate_data(self, X, reset=False, dtype=[np.float32, np.float64]))

    def predict(self, X) -> np.ndarray:
        """(n_samples,) the most probable label of every row, from classes_."""
        proba = self.predict_proba(X)      # first: it raises NotFittedError before classes_ exists
        return self.classes_[proba.argmax(1)]


class LinearHead(ProbeClassifier):
    """nn.Linear trained with SGD + momentum + StepLR; the head stage's defaults."""

    head_type = "linear"

    def __init__(self, epochs: int = 25, batch_size: int = 4, lr: float = 0.001, momentum: float = 0.9,
                 weight_decay: float = 0.0, step_size: int = 7, gamma: float = 0.1, class_weight: str = "none",
                 seed: int = 0, device: str = "cpu", verbose: bool = False) -> None:
        self.epochs, self.batch_size, self.lr, self.momentum = epochs, batch_size, lr, momentum
        self.weight_decay, self.step_size, self.gamma, self.class_weight = weight_decay, step_size, gamma, class_weight
        self.seed, self.device, self.verbose = seed, device, verbose


class MLPHead(ProbeClassifier):
    """One hidden layer (Linear -> ReLU -> Dropout -> Linear), trained like LinearHead."""

    head_type = "mlp"

    def __init__(self, hidden: int = 512, dropout: float = 0.0, epochs: int = 25, batch_size: int = 4,
                 lr: float = 0.001, momentum: float = 0.9, weight_decay: float = 0.0, step_size: int = 7,
                 gamma: float = 0.1, class_weight: str = "none", seed: int = 0, device: str = "cpu",
                 verbose: bool = False) -> None:
        self.hidden, self.dropout = hidden, dropout
        self.epochs, self.batch_size, self.lr, self.momentum = epochs, batch_size, lr, momentum
        self.weight_decay, self.step_size, self.gamma, self.class_weight = weight_decay, step_size, gamma, class_weight
        self.seed, self.device, self.verbose = seed, device, verbose


class KNNHead(ProbeClassifier):
    """Weighted k-NN on L2-normalised features (DINO's k-NN evaluation)."""

    head_type = "knn"

    def __init__(self, k: int = 20, temperature: float = 0.07, seed: int = 0, device: str = "cpu",
                 verbose: bool = False) -> None:
        self.k, self.temperature, self.seed, self.device, self.verbose = k, temperature, seed, device, verbose


class NCMHead(ProbeClassifier):
    """Nearest class mean on centred, L2-normalised features."""

    head_type = "ncm"

    def __init__(self, temperature: float = 0.07, seed: int = 0, device: str = "cpu", verbose: bool = False) -> None:
        self.temperature, self.seed, self.device, self.verbose = temperature, seed, device, verbose


ESTIMATORS: dict[str, type] = {"linear": LinearHead, "mlp": MLPHead, "knn": KNNHead, "ncm": NCMHead}


def make_estimator(head_type: str, params: Optional[dict] = None, **kwargs) -> ProbeClassifier:
    """An unfitted estimator of head_type; an unknown head type or parameter is an error naming it."""
    make_config(head_type, params)           # the error names the parameter and the allowed ones
    return ESTIMATORS[check_head_type(head_type)](**(params or {}), **kwargs)
