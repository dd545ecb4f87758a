"""Honest selection: a stage chooses its model on val (or on train), then scores test once, for that model.

The test split (a test/ folder, or data.test_fraction) never takes part in choosing anything: the
stages call `score_test` only after their choice is final, once, and record what it returns next to
val_acc. `selected_on` says what the choice looked at, so the results table can say which val
figures are optimistic (they chose the model they score). The finetune stage, which trains on images,
scores its kept epoch on the test images and records the same fields through `score_test_probs`.
The tables' wording for what their figures mean is metrics.also_selected / metrics.selection_note. numpy only.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from pipeline.analysis import score_proba

Proba = Callable[[np.ndarray], np.ndarray]   # (n_samples, feature_dim) -> (n_samples, num_classes)


def score_test(stage: str, inputs: Any, predict_proba: Proba, selected_on: str) -> dict:
    """The metrics fields for the chosen model on the test split, printed in one line.

    inputs: anything with an optional `test` (features (n, feature_dim), labels (n,)), such as
    orchestrate.StageFeatures; predict_proba is called once, on the test features only.
    Returns selected_on and test_acc (None without a test split), test_mean_per_class, n_test.
    """
    test = getattr(inputs, "test", None)
    if test is None or len(test.labels) == 0:
        return untested(selected_on)
    proba = predict_proba(np.asarray(test.features, dtype=np.float32))
    return score_test_probs(stage, test.labels, proba, selected_on)


def untested(selected_on: str) -> dict:
    """The metrics fields of a stage whose data has no test split."""
    return {"selected_on": selected_on, "test_acc": None}


def score_test_probs(stage: str, labels: np.ndarray, proba: np.ndarray, selected_on: str) -> dict:
    """score_test's fields from the chosen model's test probabilities (n_test, num_classes), computed once
    by the caller (finetune: over the test images), printed in one line."""
    s = score_proba(np.asarray(labels), proba)
    print(f"{stage}: test top-1 {s['acc']:.4f}, mean per-class {s['mean_per_class']:.4f} on {s['n']} test "
          f"images (scored once, after choosing on {selected_on})")
    return {"selected_on": selected_on, "test_acc": s["acc"], "test_mean_per_class": s["mean_per_class"],
            "n_test": s["n"]}
