"""Error analysis a person can act on: scores, most-confused class pairs, per-image prediction rows.

Inputs are plain arrays: y_true (n_samples,) int class indices, proba (n_samples, num_classes)
class probabilities, paths (n_samples,) image files. numpy only.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pipeline.class_report import confusion_counts

from pipeline.fsutil import atomic_path

PREDICTIONS_FILE = "val_predictions.csv"


def _labels(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true).astype(np.int64), np.asarray(y_pred).astype(np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"{y_true.shape} targets but {y_pred.shape} predictions")
    return y_true, y_pred


def score_labels(y_true, y_pred) -> dict:
    """Top-1 accuracy, mean per-class accuracy (the unweighted mean of each present class's recall), n.

    Mean per-class gives a rare class the weight of a common one: with imbalance the two differ.
    """
    y_true, y_pred = _labels(y_true, y_pred)
    if len(y_true) == 0:
        raise ValueError("scores of no samples")
    recalls = [float((y_pred[y_true == c] == c).mean()) for c in np.unique(y_true)]
    return {"acc": float((y_true == y_pred).mean()), "mean_per_class": float(np.mean(recalls)), "n": len(y_true)}


def wilson_interval(acc: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a top-1 of acc measured on n images (95 % for the default z, the normal
    distribution's 97.5 % quantile): how far the figure could be from the accuracy on more images like
    these (Wilson 1927; it stays inside [0, 1])."""
    if n <= 0:
        raise ValueError(f"an interval needs images, got n={n}")
    centre = (acc + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def ranking_note(n: int, best: float, others: Sequence[float], noun: str, leader: str = "winner") -> str:
    """How far n val images let a ranking go: one image's share of top-1, the leader's 95% Wilson interval
    and how many of the others (their val top-1) score inside it."""
    lo, hi = wilson_interval(best, n)
    inside = sum(lo <= a <= hi for a in others)
    note = (f"val has {n} images (one is {1 / n:.4f} of top-1): the {leader}'s 95% interval is {lo:.4f}-{hi:.4f} "
            f"(Wilson) and {inside} of the other {len(others)} {noun} score inside it")
    return note + (f", which val does not tell apart from the {leader} reliably" if inside else "")


def score_proba(y_true, proba) -> dict:
    """score_labels of the most probable class of every row of proba (n_samples, num_classes)."""
    return score_labels(y_true, np.asarray(proba).argmax(1))


@dataclass(frozen=True)
class ConfusedPair:
    true: str
    predicted: str
    count: int            # val images of `true` predicted as `predicted`
    fraction: float       # count / images of `true`


def confused_pairs(y_true, y_pred, classes: Sequence[str], top: int = 5) -> list[ConfusedPair]:
    """The `top` most frequent (true, predicted) mistakes, most first; ties in class order."""
    y_true, y_pred = _labels(y_true, y_pred)
    n = len(classes)
    if len(y_true) and max(int(y_true.max()), int(y_pred.max())) >= n:
        raise ValueError(f"a label is >= the {n} classes given")
    matrix = confusion_counts(y_true, y_pred, n)
    support = matrix.sum(1)
    np.fill_diagonal(matrix, 0)
    pairs = [(int(matrix[t, p]), t, p) for t in range(n) for p in range(n) if matrix[t, p]]
    pairs.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [ConfusedPair(classes[t], classes[p], c, c / support[t]) for c, t, p in pairs[:top]]


def format_confused_pairs(pairs: Sequence[ConfusedPair]) -> str:
    """A plain-text table: true class, predicted as, count, share of the true class."""
    if not pairs:
        return "no confusions: every image was predicted as its own class"
    rows = [("true", "predicted as", "images", "share")] + [
        (p.true, p.predicted, str(p.count), f"{p.fraction:.1%}") for p in pairs]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def prediction_rows(paths: Sequence[str], y_true: Optional[Sequence[int]], proba, classes: Sequence[str],
                    top_k: int = 3) -> list[dict]:
    """One row per image: path, true class ('' when unlabelled), predicted class, its probability,
    correct, and the top-k as 'class:probability' joined by '; '."""
    proba = np.asarray(proba)
    if proba.ndim != 2 or proba.shape != (len(paths), len(classes)):
        raise ValueError(f"proba has shape {proba.shape}, expected ({len(paths)}, {len(classes)})")
    k = max(1, min(top_k, len(classes)))
    order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    rows = []
    for i, path in enumerate(paths):
        pred = int(order[i, 0])
        true = "" if y_true is None else classes[int(y_true[i])]
        rows.append({"path": str(path), "true": true, "predicted": classes[pred],
                     "probability": round(float(proba[i, pred]), 6),
                     "correct": "" if y_true is None else int(true == classes[pred]),
                     "top_k": "; ".join(f"{classes[j]}:{proba[i, j]:.4f}" for j in order[i])})
    return rows


def write_predictions_csv(path: Path, rows: Sequence[dict]) -> Path:
    """Write the rows atomically (a temporary file renamed into place): never half a CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["path", "true", "predicted", "probability", "correct", "top_k"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def labelled_summary(y_true, proba, classes: Sequence[str], top: int = 5) -> str:
    """What `predict` on a labelled folder prints: top-1 and mean per-class side by side, then the
    most confused pairs."""
    y_pred = np.asarray(proba).argmax(1)
    s = score_labels(y_true, y_pred)
    return (f"top-1 {s['acc']:.4f}, mean per-class {s['mean_per_class']:.4f} on {s['n']} labelled images\n"
            f"most confused pairs:\n{format_confused_pairs(confused_pairs(y_true, y_pred, classes, top))}")
