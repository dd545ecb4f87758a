"""Per-class precision, recall, F1 and support in numpy, in scikit-learn's classification_report shape.

The reports every training stage writes need only this table; computing it here keeps scikit-learn's
import (about a second) out of the head stage. ``tests/test_class_report.py`` checks it equals
``sklearn.metrics.classification_report`` (dict and text) with ``zero_division=0``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (scikit-learn's zero_division=0)."""
    return np.divide(num, den, out=np.zeros(len(num)), where=den > 0)


def confusion_counts(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts: row = true class, column = predicted class."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> dict:
    """{class: {precision, recall, f1-score, support}, "accuracy", "macro avg", "weighted avg"}.

    y_true, y_pred: class indices in [0, len(classes)); every class is listed, present or not.
    """
    n = len(classes)
    confusion = confusion_counts(y_true, y_pred, n)
    hits = np.diag(confusion).astype(np.float64)
    support, predicted = confusion.sum(1).astype(np.float64), confusion.sum(0).astype(np.float64)
    precision, recall = _ratio(hits, predicted), _ratio(hits, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    report = {name: {"precision": float(p), "recall": float(r), "f1-score": float(f), "support": float(s)}
              for name, p, r, f, s in zip(classes, precision, recall, f1, support)}
    total = support.sum()
    report["accuracy"] = float(hits.sum() / total) if total else 0.0
    weights = support / total if total else np.zeros(n)
    for name, avg in (("macro avg", lambda v: float(np.mean(v)) if n else 0.0),
                      ("weighted avg", lambda v: float(np.sum(v * weights)))):
        report[name] = {"precision": avg(precision), "recall": avg(recall), "f1-score": avg(f1),
                        "support": float(total)}
    return report


def report_text(report: dict, classes: Sequence[str], digits: int = 3) -> str:
    """The report as scikit-learn prints it: one row per class, then accuracy, macro and weighted avg."""
    headers = ("precision", "recall", "f1-score", "support")
    width = max([len(c) for c in classes] + [len("weighted avg"), digits])
    lines = [f"{'':>{width}s} " + "".join(f" {h:>9}" for h in headers), ""]

    def row(name: str, values: dict) -> str:
        figures = "".join(f" {values[h]:>9.{digits}f}" for h in headers[:3])
        return f"{name:>{width}s} {figures} {int(values['support']):>9}"

    lines += [row(c, report[c]) for c in classes] + [""]
    support = int(report["macro avg"]["support"])
    lines.append(f"{'accuracy':>{width}s}  {'':>9} {'':>9} {report['accuracy']:>9.{digits}f} {support:>9}")
    lines += [row(name, report[name]) for name in ("macro avg", "weighted avg")]
    return "\n".join(lines) + "\n"
