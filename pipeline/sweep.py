"""Sweeps: many heads from one set of cached features, selected on val only, with an honest leaderboard.

    configs = expand_grid({"linear": {"lr": [1e-3, 1e-2], "weight_decay": [0, 1e-4]},
                           "knn": {"k": [10, 20]}, "ncm": {}, "logistic": {"C": [0.1, 1]}})
    outcome = run_sweep(configs, X, y, X_val, y_val, X_test, y_test)
    print(format_leaderboard(outcome))      # from pipeline.sweep_report, with the files it writes

All linear configurations that share epochs, batch_size and class_weight are trained in ONE batched
run (pipeline/joint.py); so are the MLPs that share them, and the kNN (NCM) configurations
share one similarity search (one set of class means): pipeline/probe_groups.py. Best epochs, C and the winner are chosen on val; test, when given, is
scored once, after selection, for the chosen models only: the winner and the best of each head type.
scikit-learn (logistic) and matplotlib (sweep.png) are imported only when used; the logistic configs
are usually fitted in a child process that overlaps scikit-learn's import with the rest (pipeline/logistic_worker.py).
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from pipeline import logistic_worker
from pipeline.analysis import score_proba
from pipeline.joint import shared_key, train_linear_heads
from pipeline.probe_groups import fit_knn_group, fit_mlp_group, fit_ncm_group, mlp_group_key
from pipeline.probes import (CONSTRAINTS, HEAD_TYPES, Array, ProbeError, as_features, as_labels, build_probe,
                             infer_num_classes, make_config, param_names)

SWEEP_TYPES = HEAD_TYPES + ("logistic",)
# logistic: StandardScaler + LogisticRegression(C), as the logistic stage fits it, but C chosen on val.
LOGISTIC_DEFAULTS = {"C": 1.0, "max_iter": 1000}
LOGISTIC_CONSTRAINTS = {
    "C": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
          "a number > 0"),
    "max_iter": CONSTRAINTS["epochs"],
}
# The report files and notes, here so pipeline.sweep_report and any caller reach them without importing it.
SWEEP_JSON, SWEEP_MD, SWEEP_PNG = "sweep.json", "sweep.md", "sweep.png"
NO_TEST_NOTE = ("no test split: the val figures were also used for selection (best epochs, C, the winner), "
                "so they are optimistic")
TEST_NOTE = ("selected on val only; test was scored once, after selection, for the winner and the best of "
             "each head type")
JOINT_NOTE = ("* trained jointly with the other heads of its group (linear heads or MLPs in one batched run, kNN or "
              "NCM on one shared similarity search): seconds is its share of that run")


class SweepError(ProbeError):
    """A sweep.grid that cannot be run; the message names the head type or parameter at fault."""


# ----------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class SweepConfig:
    head_type: str
    params: tuple[tuple[str, Any], ...]     # the grid's values for this configuration, in grid order

    @property
    def param_dict(self) -> dict:
        return dict(self.params)

    def label(self) -> str:
        return ", ".join(f"{k}={_value_text(v)}" for k, v in self.params) or "defaults"


def _value_text(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def full_params(config: SweepConfig, defaults: Optional[dict] = None) -> dict:
    """The grid's values over defaults[head_type]: the values of the parameters the grid leaves out."""
    return {**(defaults or {}).get(config.head_type, {}), **config.param_dict}


def allowed_params(head_type: str) -> tuple[str, ...]:
    return tuple(LOGISTIC_DEFAULTS) if head_type == "logistic" else param_names(head_type)


def check_logistic(params: dict) -> dict:
    for name, value in params.items():
        ok, allowed = LOGISTIC_CONSTRAINTS[name]
        if not ok(value):
            raise SweepError(f"sweep.grid.logistic.{name} = {value!r}: must be {allowed}")
    return {**LOGISTIC_DEFAULTS, **params}


def expand_grid(grid: dict) -> list[SweepConfig]:
    """Every configuration of grid {head_type: {param: [values]}} (a scalar counts as [scalar]).

    An unknown head type or parameter, an empty list or a value out of range is a SweepError naming it.
    """
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"sweep.grid must be a non-empty object {{head type: {{parameter: [values]}}}} "
                         f"with head types among {', '.join(SWEEP_TYPES)}")
    configs = []
    for head_type, space in grid.items():
        if head_type not in SWEEP_TYPES:
            raise SweepError(f"sweep.grid has unknown head type '{head_type}' (use: {', '.join(SWEEP_TYPES)})")
        if not isinstance(space, dict):
            raise SweepError(f"sweep.grid.{head_type} must be an object {{parameter: [values]}}, "
                             f"got {type(space).__name__} ({{}} for the defaults)")
        allowed = allowed_params(head_type)
        for name, values in space.items():
            if name not in allowed:
                raise SweepError(f"sweep.grid.{head_type} has unknown parameter '{name}' "
                                 f"(allowed: {', '.join(allowed)})")
            if isinstance(values, list) and not values:
                raise SweepError(f"sweep.grid.{head_type}.{name} is an empty list: give at least one value")
        names = list(space)
        lists = [v if isinstance(v, list) else [v] for v in space.values()]
        for combo in itertools.product(*lists):
            params = dict(zip(names, combo))
            try:
                check_logistic(params) if head_type == "logistic" else make_config(head_type, params)
            except SweepError:
                raise
            except ProbeError as e:
                raise SweepError(f"sweep.grid.{e}") from None
            configs.append(SweepConfig(head_type, tuple(params.items())))
    seen, unique = set(), []
    for c in configs:                       # the same configuration twice would be trained twice
        if c not in seen:
            seen.add(c)
            unique.append(c)
    return unique


# ----------------------------------------------------------------------------- results
@dataclass
class SweepResult:
    config: SweepConfig
    val_acc: float
    val_mean_per_class: float
    seconds: float
    joint: bool = False                     # seconds is a share of one batched run
    best_epoch: Optional[int] = None
    test_acc: Optional[float] = None
    test_mean_per_class: Optional[float] = None
    model: Any = field(default=None, repr=False)   # the fitted probe / sklearn pipeline (predict_proba)
    position: int = 0                       # index in the grid: breaks ties in the ranking

    @property
    def head_type(self) -> str:
        return self.config.head_type

    def to_dict(self) -> dict:
        return {"head_type": self.head_type, "params": self.config.param_dict, "val_acc": self.val_acc,
                "val_mean_per_class": self.val_mean_per_class, "test_acc": self.test_acc,
                "test_mean_per_class": self.test_mean_per_class, "seconds": round(self.seconds, 4),
                "joint": self.joint, "best_epoch": self.best_epoch}


@dataclass
class SweepOutcome:
    results: list[SweepResult]              # in the order they finished
    has_test: bool
    interrupted: bool
    seconds: float
    planned: int                            # configurations in the grid
    n_val: Optional[int] = None             # images the val figures were measured on (None: not known)
    n_test: Optional[int] = None

    def ranked(self) -> list[SweepResult]:
        """Best first by val top-1, then val mean per-class; ties keep the grid's order."""
        return sorted(self.results, key=lambda r: (-r.val_acc, -r.val_mean_per_class, r.position))

    @property
    def winner(self) -> Optional[SweepResult]:
        ranked = self.ranked()
        return ranked[0] if ranked else None

    def chosen(self) -> list[SweepResult]:
        """The winner and the best of each head type (what test is scored for)."""
        best: dict[str, SweepResult] = {}
        for r in self.ranked():
            best.setdefault(r.head_type, r)
        return list(best.values())


def _logistic_params(unit: list[SweepConfig], defaults: Optional[dict]) -> list[dict]:
    return [check_logistic(full_params(c, defaults)) for c in unit]


class LogisticModel:
    """A fitted sklearn pipeline whose predict_proba has one column per class index, present in train or not.

    From the sweep's child process (pipeline/logistic_worker.py) it holds the pickled pipeline, its
    probabilities on the arrays the child scored (val, test) and its fold; the pipeline is unpickled,
    and scikit-learn imported, only when asked for (.model, or predict_proba on other rows)."""

    def __init__(self, model, num_classes: int, blob: Optional[bytes] = None, known: Sequence = (),
                 folded: Optional[tuple] = None) -> None:
        self._model, self.num_classes, self._blob = model, num_classes, blob
        self._known, self._folded = list(known), folded           # [(rows, their probabilities)], (weight, bias)

    @property
    def model(self):
        if self._model is None:
            import pickle

            self._model = pickle.loads(self._blob)
        return self._model

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """(weight (num_classes, n_features), bias): one linear layer with the same probabilities."""
        if self._folded is None:
            from pipeline.logistic_worker import fold

            self._folded = fold(self.model, self.num_classes)
        return self._folded

    def predict_proba(self, X) -> np.ndarray:
        X = np.asarray(X)
        for rows, proba in self._known:
            if rows.shape == X.shape and np.array_equal(rows, X):
                return proba.copy()
        from pipeline.logistic_worker import class_proba

        return class_proba(self.model, X, self.num_classes)


def _logistic_fits(unit, k, ahead, x, labels, num_classes, seed, defaults, evals):
    """(config, LogisticModel, seconds) for logistic unit k, C ascending: from the child when it ran, else here."""
    fits = ahead.collect(k) if ahead is not None else None
    if fits is not None:
        for fit in fits:
            model = LogisticModel(None, num_classes, fit["blob"], list(zip(evals, fit["proba"])), fit["fold"])
            yield unit[fit["index"]], model, fit["seconds"]
        return
    from pipeline.logistic_worker import fit_path

    for i, model, seconds in fit_path(_logistic_params(unit, defaults), x.numpy(), labels.numpy(), seed):
        yield unit[i], LogisticModel(model, num_classes), seconds


GROUP_FITS = {"mlp": fit_mlp_group, "knn": fit_knn_group, "ncm": fit_ncm_group}


def _group_key(c: SweepConfig, defaults: Optional[dict], device: Union[str, torch.device] = "cpu") -> tuple:
    """Configs with equal keys form one work unit; a key ending in a config trains it alone."""
    if c.head_type == "linear":
        return "linear", shared_key(make_config("linear", full_params(c, defaults)))
    if c.head_type == "logistic":
        return "logistic", check_logistic(full_params(c, defaults))["max_iter"]
    if c.head_type == "mlp":
        key = mlp_group_key(make_config("mlp", full_params(c, defaults)), device)
        return ("mlp", key) if key is not None else ("alone", c)
    return (c.head_type,)                     # every kNN config shares one search, every NCM one set of means


def _order(configs: Sequence[SweepConfig], defaults: Optional[dict] = None,
           device: Union[str, torch.device] = "cpu") -> list[list[SweepConfig]]:
    """Work units: the joint groups of linear configs (first), then the other groups (MLPs that train
    together, all kNN, all NCM, an MLP with dropout on CUDA alone) in grid order, and one unit per max_iter of
    the logistic configs (last: scikit-learn is imported only if there are any)."""
    units: dict[tuple, list[SweepConfig]] = {}
    for c in configs:
        units.setdefault(_group_key(c, defaults, device), []).append(c)
    rank = {"linear": 0, "logistic": 2}
    return [u for _, u in sorted(units.items(), key=lambda kv: rank.get(kv[0][0], 1))]   # stable: grid order


def _start_logistic(units, defaults, x, labels, evals, seed, num_classes):
    """(the logistic units, the child process fitting them or None): scikit-learn's import overlaps the rest."""
    logistic = [u for u in units if u[0].head_type == "logistic"]
    if not logistic_worker.wanted(len(units), len(logistic), x.numel() * x.element_size()):
        return logistic, None
    return logistic, logistic_worker.Ahead([_logistic_params(u, defaults) for u in logistic], x.numpy(),
                                           labels.numpy(), evals, seed, num_classes)


def _inputs(X: Array, y: Array, X_val: Array, y_val: Array, X_test: Optional[Array], y_test: Optional[Array],
            num_classes: Optional[int]) -> tuple:
    """(x, labels, x_val, labels_val, x_test or None, labels_test or None, num_classes), checked."""
    x = as_features(X)
    labels = as_labels(y, len(x))
    x_val = as_features(X_val, "X_val")
    labels_val = as_labels(y_val, len(x_val), "y_val")
    if len(x_val) == 0:
        raise SweepError("a sweep needs val rows: they choose the best epochs, C and the winner")
    has_test = X_test is not None and len(X_test) > 0
    x_test = as_features(X_test, "X_test") if has_test else None
    labels_test = as_labels(y_test, len(x_test), "y_test") if has_test else None
    return x, labels, x_val, labels_val, x_test, labels_test, num_classes or infer_num_classes(labels, labels_val,
                                                                                             labels_test)


def run_sweep(configs: Sequence[SweepConfig], X: Array, y: Array, X_val: Array, y_val: Array,
              X_test: Optional[Array] = None, y_test: Optional[Array] = None, num_classes: Optional[int] = None,
              seed: int = 0, device: Union[str, torch.device] = "cpu",
              on_result: Optional[Callable[[SweepResult], None]] = None, progress: bool = False,
              defaults: Optional[dict] = None) -> SweepOutcome:
    """Train every configuration on (X, y), score it on val, then score test for the chosen ones.

    defaults: {head_type: {parameter: value}} for the parameters a configuration leaves out (the
    sweep stage passes head.* there); without it, each head type's own defaults.
    X : (n_samples, n_features), y : (n_samples,) class indices; likewise val (required: it does the
    selecting) and the optional test. on_result(result) is called as each configuration finishes, so a
    caller can keep results as they come; Ctrl-C (KeyboardInterrupt) stops the sweep and returns what
    finished, with interrupted=True.
    """
    t0 = time.perf_counter()
    x, labels, x_val, labels_val, x_test, labels_test, num_classes = _inputs(X, y, X_val, y_val, X_test, y_test,
                                                                             num_classes)
    has_test = x_test is not None
    units = _order(configs, defaults, device)
    evals = [x_val.numpy()] + ([x_test.numpy()] if has_test else [])
    logistic, ahead = _start_logistic(units, defaults, x, labels, evals, seed, num_classes)
    outcome = SweepOutcome([], has_test, False, 0.0, len(configs), len(labels_val),
                           len(labels_test) if has_test else None)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(configs), desc="sweep", unit="config")

    positions = {c: i for i, c in reversed(list(enumerate(configs)))}

    def finish(result: SweepResult) -> None:
        result.position = positions[result.config]
        outcome.results.append(result)
        if bar is not None:
            bar.update(1)
        if on_result is not None:
            on_result(result)

    try:
        for unit in units:
            fits = (_logistic_fits(unit, logistic.index(unit), ahead, x, labels, num_classes, seed, defaults, evals)
                    if unit in logistic else None)
            for result in _run_unit(unit, x, labels, x_val, labels_val, num_classes, seed, device, defaults, fits):
                finish(result)
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        if bar is not None:
            bar.close()
        if ahead is not None:
            ahead.close()
    if has_test:
        for r in outcome.chosen():
            scores = score_proba(labels_test.numpy(), r.model.predict_proba(x_test))
            r.test_acc, r.test_mean_per_class = scores["acc"], scores["mean_per_class"]
    outcome.seconds = time.perf_counter() - t0
    return outcome


def _run_unit(unit: list[SweepConfig], x, labels, x_val, labels_val, num_classes, seed, device, defaults=None,
              logistic_fits=None):
    """Yield the SweepResult of every configuration of one work unit (a logistic unit's from logistic_fits)."""
    yv = labels_val.numpy()
    head_type = unit[0].head_type
    t0 = time.perf_counter()
    if head_type == "linear":
        cfgs = [make_config("linear", full_params(c, defaults)) for c in unit]
        joint = train_linear_heads(x, labels, x_val, labels_val, cfgs, num_classes=num_classes, seed=seed,
                                   device=device)
        share = joint.seconds / len(unit)
        for h, c in enumerate(unit):
            probe = joint.probe(h, seed=seed, device=device)
            s = score_proba(yv, probe.predict_proba(x_val))
            yield SweepResult(c, s["acc"], s["mean_per_class"], share, True, probe.result.best_epoch, model=probe)
        return
    if head_type == "logistic":
        for c, model, seconds in logistic_fits:
            s = score_proba(yv, model.predict_proba(x_val))
            yield SweepResult(c, s["acc"], s["mean_per_class"], seconds, False, None, model=model)
        return
    if len(unit) > 1:                   # a group (_order): its configs share their common work
        cfgs = [make_config(head_type, full_params(c, defaults)) for c in unit]
        fitted = GROUP_FITS[head_type](cfgs, x, labels, x_val, labels_val, num_classes, seed, device)
    else:
        model = build_probe(head_type, full_params(unit[0], defaults), num_classes=num_classes, seed=seed,
                            device=device).fit(x, labels, x_val, labels_val)
        fitted = [(model, model.predict_proba(x_val))]
    share = (time.perf_counter() - t0) / len(unit)
    for c, (model, proba) in zip(unit, fitted):
        s = score_proba(yv, proba)
        best_epoch = model.result.best_epoch if head_type == "mlp" else None
        yield SweepResult(c, s["acc"], s["mean_per_class"], share, len(unit) > 1, best_epoch, model=model)
