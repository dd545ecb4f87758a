"""Scores, most-confused pairs and val_predictions.csv rows."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from pipeline.analysis import (confused_pairs, format_confused_pairs, labelled_summary, prediction_rows, score_labels,
                               score_proba, wilson_interval, write_predictions_csv)

CLASSES = ["cat", "dog", "eel"]


def test_top1_and_mean_per_class_differ_under_imbalance():
    y_true = np.array([0] * 8 + [1, 1])
    y_pred = np.array([0] * 8 + [0, 1])
    s = score_labels(y_true, y_pred)
    assert s == {"acc": pytest.approx(0.9), "mean_per_class": pytest.approx((1.0 + 0.5) / 2), "n": 10}
    proba = np.eye(3)[y_pred]
    assert score_proba(y_true, proba) == s
    with pytest.raises(ValueError):
        score_labels([0, 1], [0])


def test_most_confused_pairs_most_first():
    y_true = [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    y_pred = [1, 1, 0, 0, 2, 2, 1, 2, 2, 0]
    pairs = confused_pairs(y_true, y_pred, CLASSES, top=3)
    assert [(p.true, p.predicted, p.count) for p in pairs] == [("cat", "dog", 2), ("dog", "eel", 2),
                                                               ("dog", "cat", 1)]
    assert pairs[0].fraction == pytest.approx(2 / 3) and pairs[1].fraction == pytest.approx(0.5)
    text = format_confused_pairs(pairs)
    assert text.splitlines()[0].split() == ["true", "predicted", "as", "images", "share"]
    assert "cat   dog" in text and "66.7%" in text
    assert confused_pairs([0, 1], [0, 1], CLASSES) == []
    assert "no confusions" in format_confused_pairs([])


def test_prediction_rows_and_csv(tmp_path):
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    rows = prediction_rows(["val/cat/1.jpg", "val/dog/2.jpg"], [0, 1], proba, CLASSES, top_k=2)
    assert rows[0] == {"path": "val/cat/1.jpg", "true": "cat", "predicted": "cat", "probability": 0.7,
                       "correct": 1, "top_k": "cat:0.7000; dog:0.2000"}
    assert rows[1]["predicted"] == "eel" and rows[1]["correct"] == 0 and rows[1]["top_k"] == "eel:0.6000; dog:0.3000"
    unlabelled = prediction_rows(["x.jpg"], None, proba[:1], CLASSES, top_k=5)
    assert unlabelled[0]["true"] == "" and unlabelled[0]["top_k"].count(";") == 2
    path = write_predictions_csv(tmp_path / "run" / "val_predictions.csv", rows)
    with open(path, newline="") as f:
        back = list(csv.DictReader(f))
    assert [r["path"] for r in back] == ["val/cat/1.jpg", "val/dog/2.jpg"] and back[1]["predicted"] == "eel"
    assert list(back[0]) == ["path", "true", "predicted", "probability", "correct", "top_k"]
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["val_predictions.csv"]
    with pytest.raises(ValueError, match=r"expected \(3, 3\)"):
        prediction_rows(["a", "b", "c"], None, proba, CLASSES)


def test_labelled_summary_puts_both_scores_and_the_confusions_together():
    proba = np.eye(3)[[0, 0, 0, 1, 2]]
    text = labelled_summary([0, 0, 1, 1, 2], proba, CLASSES)
    assert text.splitlines()[0] == "top-1 0.8000, mean per-class 0.8333 on 5 labelled images"
    assert "dog   cat" in text


def test_wilson_interval_matches_the_formulas_published_values():
    # scipy.stats.binomtest(k, n).proportion_ci(method="wilson")'s values, for k of n correct
    assert wilson_interval(0.9, 100) == pytest.approx((0.8256343385, 0.9447708629), abs=1e-9)
    assert wilson_interval(1.0, 20) == pytest.approx((0.8388748419, 1.0), abs=1e-9)     # stays inside [0, 1]
    lo, hi = wilson_interval(0.0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611251581, abs=1e-9)
    assert wilson_interval(0.9, 10000)[1] - wilson_interval(0.9, 10000)[0] < 0.013     # more images: narrower
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)
