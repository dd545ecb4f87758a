"""Figures a person would rather look at than read, written as PNG files.

Figures are built as ``matplotlib.figure.Figure`` objects and saved through the Agg canvas, never
through pyplot's global state: nothing opens a window, nothing needs a display, and importing this
module selects no backend.
"""
from __future__ import annotations

import math

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

WRONG, RIGHT = "#c0392b", "#1e8449"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", pil_kwargs={"compress_level": 1})  # zlib level 1: a fifth of the time of 6
    return path


def _wrap(text: str, width_inches: float, fontsize: float = 10) -> str:
    """Wrap a title to the figure's width (about 0.6 em per character), keeping explicit line breaks."""
    import textwrap

    chars = max(20, int(width_inches * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def _short(name: str, width: int = 14) -> str:
    return name if len(name) <= width else name[:width - 1] + "…"


def lr_drops(history: Sequence[dict]) -> list[tuple[int, float]]:
    """(epoch, new lr) for every epoch that started with a smaller learning rate than the one before."""
    return [(h["epoch"], h["lr"]) for prev, h in zip(history, history[1:]) if h["lr"] < prev["lr"]]


def plot_confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str], path: Path,
                          title: str) -> Path:
    """Counts of true (rows) vs predicted (columns) classes on val, with class names."""
    from pipeline.class_report import confusion_counts

    n = len(classes)
    counts = confusion_counts(y_true, y_pred, n)
    side = min(max(4.5, 0.45 * n + 2.5), 24)
    fig = _figure(side + 1, side)
    ax = fig.add_subplot()
    image = ax.imshow(counts, cmap="Blues", interpolation="nearest", vmin=0)
    fig.colorbar(image, ax=ax)
    if n <= 30:  # the counts, white on the dark half of the colour map
        threshold = counts.max() / 2
        for (i, j), value in np.ndenumerate(counts):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > threshold else "black")
    names = [_short(c) for c in classes]
    rotate = 45 if max(len(c) for c in classes) > 3 else 0
    ax.set_xticks(range(n), names, rotation=rotate, ha="right" if rotate else "center")
    ax.set_yticks(range(n), names)
    ax.set(xlabel="Predicted label", ylabel="True label")
    top1, per_class = accuracies(y_true, y_pred)
    ax.set_title(_wrap(f"{title}\nval top-1 {top1:.3f}, mean per-class {per_class:.3f} ({len(y_true)} images)",
                       side * 0.8, 11), fontsize=11)
    return _save(fig, path)


def accuracies(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    """(top-1, mean per-class) accuracy: every figure shows both, so an imbalanced val set cannot hide a
    class the model never gets right. y_true, y_pred: (n_samples,) class indices."""
    from pipeline.analysis import score_labels

    s = score_labels(y_true, y_pred)
    return s["acc"], s["mean_per_class"]


def plot_training_curves(history: Sequence[dict], path: Path, title: str) -> Path:
    """Loss and accuracy per epoch (train and val), StepLR drops as dashed lines, best val epoch starred."""
    epochs = [h["epoch"] for h in history]
    fig = _figure(10, 4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", ms=3, label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", ms=3, label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], "o-", ms=3, label="train")
    ax_acc.plot(epochs, [h["val_acc"] for h in history], "o-", ms=3, label="val")
    best = max(history, key=lambda h: h["val_acc"])  # first best, like the stages
    ax_acc.plot([best["epoch"]], [best["val_acc"]], "*", ms=14, color="gold", mec="black",
                label=f"best val {best['val_acc']:.3f} (epoch {best['epoch']})")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        for epoch, lr in lr_drops(history):
            ax.axvline(epoch - 0.5, color="grey", ls="--", lw=1)
            ax.annotate(f"lr {lr:.0e}", (epoch - 0.5, 1), xycoords=("data", "axes fraction"),
                        rotation=90, va="top", ha="right", fontsize=8, color="grey")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if len(epochs) <= 12:
            ax.set_xticks(epochs)
        else:
            from matplotlib.ticker import MaxNLocator
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(_wrap(f"{title} (start lr {history[0]['lr']:g}; dashed lines: StepLR drops)", 10, 11),
                 fontsize=11)
    return _save(fig, path)


def plot_cv_scores(cv: Sequence[dict], best_c: float, path: Path, title: str,
                   label: str = "cv accuracy (mean ± std over folds)") -> Path:
    """Cross-validated (or held-out) accuracy, mean +- std over folds, for each C of the grid."""
    cs = np.array([r["C"] for r in cv])
    mean = np.array([r["mean"] for r in cv])
    std = np.array([r["std"] for r in cv])
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    ax.errorbar(cs, mean, yerr=std, fmt="o-", capsize=3, label=label)
    ax.axvline(best_c, color="grey", ls="--", lw=1, label=f"chosen C = {best_c:g}")
    ax.set_xscale("log")
    ax.set(xlabel="C (inverse regularisation strength)", ylabel="accuracy")
    ax.set_title(_wrap(title, 6, 10), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def grid_indices(y_true: np.ndarray, y_pred: np.ndarray, confidence: np.ndarray, n: int,
                 seed: int = 0) -> list[int]:
    """Which samples to show: the most confident mistakes (up to half the grid), then correct ones
    taken from each true class in turn (seeded), so that every class gets a look."""
    y_true, y_pred, confidence = map(np.asarray, (y_true, y_pred, confidence))
    n = min(n, len(y_true))
    wrong = np.flatnonzero(y_true != y_pred)
    n_right = len(y_true) - len(wrong)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][: max(n // 2, n - n_right)]
    rng = np.random.default_rng(seed)
    right = np.flatnonzero(y_true == y_pred)
    queues = [list(rng.permutation(right[y_true[right] == c])) for c in np.unique(y_true[right])]
    chosen: list[int] = []
    while len(chosen) < n - len(wrong):
        for queue in queues:
            if queue and len(chosen) < n - len(wrong):
                chosen.append(int(queue.pop()))
    return [int(i) for i in wrong] + sorted(chosen)


def plot_prediction_grid(images: Sequence, true: Sequence[str], predicted: Sequence[str],
                         probability: Sequence[float], path: Path, title: str) -> Path:
    """Images with 'predicted (p) / true' titles; mistakes in red with a red frame."""
    n = len(images)
    cols = min(n, 4 if n <= 8 else 6 if n <= 24 else 8)
    rows = int(np.ceil(n / cols))
    fig = _figure(2.1 * cols, 2.4 * rows + 0.4)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for ax, img, t, p, prob in zip(axes, images, true, predicted, probability):
        ok = t == p
        colour = RIGHT if ok else WRONG
        ax.imshow(img, interpolation="nearest" if min(img.size) < 64 else "antialiased")
        ax.set_title(f"pred {_short(p)} ({prob:.2f})\ntrue {_short(t)}", fontsize=8, color=colour)
        if not ok:
            ax.set_frame_on(True)
            for spine in ax.spines.values():
                spine.set_edgecolor(WRONG)
                spine.set_linewidth(3)
    fig.suptitle(_wrap(title, 2.1 * cols, 10), fontsize=10)
    return _save(fig, path)


def accuracy_axis_start(values: Sequence[float]) -> float:
    """Where the accuracy axis starts: the multiple of 0.05 at least 0.05 below the lowest value, or 0."""
    low = min([v for v in values if v] or [0.0])
    return max(0.0, math.floor((low - 0.05) / 0.05 + 1e-9) * 0.05)


def plot_benchmark(rows: Sequence[dict], path: Path, title: str, note: Optional[str] = None,
                   split: str = "val") -> Path:
    """Left: top-1 and mean per-class accuracy per method on split (val, or test: the headline when
    scored); right: wall seconds split by phase.

    The accuracy axis starts just below the lowest value so that 0.93 vs 0.95 is visible; every bar
    carries its value; each cost bar ends at the table's total_seconds (what the phases leave out,
    such as loading the cache and the val passes, is its own segment).
    """
    labels = [f"{r['backbone']}\n{r['method']}" for r in rows]
    y = np.arange(len(rows))
    fig = _figure(12, 2.2 + 0.7 * len(rows))
    ax_acc, ax_time = fig.subplots(1, 2)
    keys = ("test_acc", "test_mean_per_class") if split == "test" else ("val_acc", "mean_per_class_acc")
    top1 = [r.get(keys[0]) or 0.0 for r in rows]
    per_class = [r.get(keys[1]) or 0.0 for r in rows]
    start = accuracy_axis_start(top1 + per_class)
    for offset, values, label in ((-0.2, top1, f"{split} top-1"), (0.2, per_class, "mean per-class")):
        ax_acc.barh(y + offset, [v - start if v else 0.0 for v in values], 0.4, left=start, label=label)
        for yi, v in zip(y, values):
            if v:
                ax_acc.annotate(f"{v:.3f}", (v, yi + offset), xytext=(3, 0), textcoords="offset points",
                                va="center", fontsize=8)
    ax_acc.set(xlim=(start, 1 + 0.14 * (1 - start)), title=f"accuracy on {split}",
               xlabel="accuracy" + (f" (axis starts at {start:.2f})" if start else ""))
    left = np.zeros(len(rows))
    totals = np.array([r.get("total_seconds") or 0.0 for r in rows])
    for key, name in (("extract_seconds", "extraction (one-time)"), ("fit_seconds", "head / logistic fit"),
                      ("finetune_seconds", "finetuning"), (None, "loading, val passes, reports")):
        if key is None:  # the rest of the table's total
            values = np.clip(totals - left, 0.0, None)
        else:
            values = np.array([r.get(key) or 0.0 for r in rows])
        ax_time.barh(y, values, 0.6, left=left, label=name)
        left += values
    for yi, total in zip(y, np.maximum(totals, left)):
        ax_time.annotate(f"{total:.1f} s", (total, yi), xytext=(3, 0), textcoords="offset points",
                         va="center", fontsize=8)
    ax_time.set(xlabel="wall seconds (the table's total s)", title="cost", xlim=(0, max(left.max(), 1) * 1.18))
    for ax in (ax_acc, ax_time):
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=4, frameon=False)
    fig.suptitle(_wrap(title + (f"\n{note}" if note else ""), 12, 10), fontsize=10)
    return _save(fig, path)
