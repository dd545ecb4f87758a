"""Figures a person would rather look at than read, written as PNG files.

Figures are built as ``matplotlib.figure.Figure`` objects and saved through the Agg canvas, never
through pyplot's global state: nothing opens a window, nothing needs a display, and importing this
module selects no backend.

The confusion matrix and the training curves place their axes at fixed positions (`_axes_at`) with
margins worked out from their text (`text_width`, `_text_height`): matplotlib's constrained layout
measures every artist several times, 0.35-0.45 s of a warm head run's 3-4 s. The prediction grid
is drawn by Pillow alone: one image of the tiles with its captions written on it, where an axes and
text artists per tile cost 0.3-0.5 s.
"""
from __future__ import annotations

import math
import zlib

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

WRONG, RIGHT = "#c0392b", "#1e8449"
DPI = 100           # figures are drawn and saved at this resolution (the prediction grid: pixels per inch)
EM = 0.65           # DejaVu Sans (matplotlib's default font): widest usual advance of a letter or digit, in em
LINE = 1.25         # matplotlib's line spacing (1.2) and a little air, in em
TILE = 196          # prediction grid: each image fits a TILE x TILE pixel box
CELL = (210, 256)   # prediction grid: a tile, two caption lines above it and its file name below, in pixels
FRAME = 4           # prediction grid: the red frame of a mistake, in pixels
# zlib level 1 takes a fifth of level 6's time, and run-length matching 0.7 of the default strategy's (PNG
# filtering leaves long runs) for files no larger
PNG = {"compress_level": 1, "compress_type": zlib.Z_RLE}


def _figure(width: float, height: float, layout: Optional[str] = "constrained"):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout=layout)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, pil_kwargs=PNG)
    return path


def _wrap(text: str, width_inches: float, fontsize: float = 10) -> str:
    """Wrap a title to the figure's width (about 0.6 em per character), keeping explicit line breaks."""
    import textwrap

    chars = max(20, int(width_inches * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def text_width(text: str, fontsize: float = 10) -> float:
    """Inches the longest line of text takes at most (EM per character)."""
    return max(len(line) for line in text.split("\n")) * EM * fontsize / 72


def _text_height(text: str, fontsize: float = 10) -> float:
    """Inches the lines of text take."""
    return (text.count("\n") + 1) * LINE * fontsize / 72


def _short(name: str, width: int = 14) -> str:
    return name if len(name) <= width else name[:width - 1] + "…"


def lr_drops(history: Sequence[dict]) -> list[tuple[int, float]]:
    """(epoch, new lr) for every epoch that started with a smaller learning rate than the one before."""
    return [(h["epoch"], h["lr"]) for prev, h in zip(history, history[1:]) if h["lr"] < prev["lr"]]


def plot_confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str], path: Path,
                          title: str) -> Path:
    """Counts of true (rows) vs predicted (columns) classes on val, with class names."""
    return _save(confusion_figure(y_true, y_pred, classes, title), path)


def confusion_figure(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str], title: str):
    """The Figure of plot_confusion_matrix."""
    from pipeline.class_report import confusion_counts

    n = len(classes)
    counts = confusion_counts(y_true, y_pred, n)
    names = [_short(c) for c in classes]
    rotate = 45 if max(len(c) for c in classes) > 3 else 0
    side = min(max(3.0, 0.5 * n), 20)                           # the matrix, inches
    label = max(text_width(name) for name in names) + 0.1      # a tick label and its tick
    below = 0.71 * (label + 0.17) if rotate else 0.3            # x tick labels, rotated: their bounding box
    left, bottom = 0.45 + label, 0.45 + below                   # then the axis label (0.2) and air
    right = 0.55 + text_width(str(counts.max())) + 0.1         # colourbar gap and bar, its labels, air
    top1, per_class = accuracies(y_true, y_pred)
    heading = _wrap(f"{title}\nval top-1 {top1:.3f}, mean per-class {per_class:.3f} ({len(y_true)} images)",
                    left + side + right - 0.3, 11)
    top = _text_height(heading, 11) + 0.25
    fig = _figure(left + side + right, bottom + side + top, layout=None)
    from matplotlib.ticker import MaxNLocator  # after _figure, which imports matplotlib

    ax = _axes_at(fig, left, bottom, side, side)
    image = ax.imshow(counts, cmap="Blues", interpolation="nearest", vmin=0, aspect="auto")
    fig.colorbar(image, cax=_axes_at(fig, left + side + 0.2, bottom, 0.2, side),
                 ticks=MaxNLocator(integer=True))
    if n <= 30:  # the counts, white on the dark half of the colour map
        threshold = counts.max() / 2
        for (i, j), value in np.ndenumerate(counts):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > threshold else "black")
    ax.set_xticks(range(n), names, rotation=rotate, ha="right" if rotate else "center")
    ax.set_yticks(range(n), names)
    ax.set(xlabel="Predicted label", ylabel="True label")
    fig.text(0.5, 1 - 0.12 / fig.get_figheight(), heading, ha="center", va="top", fontsize=11)
    return fig


def _axes_at(fig, left: float, bottom: float, width: float, height: float):
    """An axes at a fixed place, given in inches from the figure's lower left corner."""
    w, h = fig.get_figwidth(), fig.get_figheight()
    return fig.add_axes((left / w, bottom / h, width / w, height / h))


def accuracies(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    """(top-1, mean per-class) accuracy: every figure shows both, so an imbalanced val set cannot hide a
    class the model never gets right. y_true, y_pred: (n_samples,) class indices."""
    from pipeline.analysis import score_labels

    s = score_labels(y_true, y_pred)
    return s["acc"], s["mean_per_class"]


def plot_training_curves(history: Sequence[dict], path: Path, title: str) -> Path:
    """Loss and accuracy per epoch (train and val), StepLR drops as dashed lines, best val epoch starred."""
    return _save(curves_figure(history, title), path)


def curves_figure(history: Sequence[dict], title: str):
    """The Figure of plot_training_curves."""
    epochs = [h["epoch"] for h in history]
    heading = _wrap(f"{title} (start lr {history[0]['lr']:g}; dashed lines: StepLR drops)", 9.7, 11)
    top = _text_height(heading, 11) + 0.5                       # the title, then the axes titles (12 pt)
    fig = _figure(10, 3.5 + top, layout=None)
    # each axes: 0.85 in on its left for tick labels of up to 5 characters and the axis label
    ax_loss, ax_acc = (_axes_at(fig, left, 0.55, 4.05, 2.95) for left in (0.85, 5.8))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", ms=3, label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", ms=3, label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], "o-", ms=3, label="train")
    ax_acc.plot(epochs, [h["val_acc"] for h in history], "o-", ms=3, label="val")
    best = max(history, key=lambda h: h["val_acc"])  # first best, like the stages
    ax_acc.plot([best["epoch"]], [best["val_acc"]], "*", ms=14, color="gold", mec="black",
                label=f"best val {best['val_acc']:.3f} (epoch {best['epoch']})")
    ax_acc.set(xlabel="epoch", ylabel="accuracy")
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_title(name, y=1.0)  # placed, not fitted above the tick labels (there are none on top)
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
    fig.text(0.5, 1 - 0.1 / fig.get_figheight(), heading, ha="center", va="top", fontsize=11)
    return fig


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
                         probability: Sequence[float], path: Path, title: str,
                         files: Optional[Sequence[str]] = None) -> Path:
    """Images (PIL) with 'predicted (p) / true' captions above and their file names below; mistakes in red
    with a red frame. Drawn with Pillow alone, in matplotlib's font: the tiles pasted edge to edge
    (`_mosaic`) and the captions written on them (an axes and a text artist per tile cost 0.3-0.5 s)."""
    from PIL import Image, ImageDraw

    n = len(images)
    cols = min(n, 4 if n <= 8 else 6 if n <= 24 else 8)
    width = CELL[0] * cols
    caption, small, big = (_font(pt) for pt in (8, 7, 10))
    heading = _wrap(title, width / DPI - 0.2, 10).split("\n")
    top = len(heading) * _line(10) + 14                       # pixels above the first row
    wrong = [t != p for t, p in zip(true, predicted)]
    canvas, boxes = _mosaic(images, wrong, cols, top)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for k, line in enumerate(heading):
        _centred(draw, width / 2, 6 + k * _line(10), line, big, "black")
    for i, ((x, y, w, h), t, p, prob, bad) in enumerate(zip(boxes, true, predicted, probability, wrong)):
        colour, above = (WRONG if bad else RIGHT), y - FRAME - 3 - 2 * _line(8)
        _centred(draw, x + w / 2, above, f"pred {_short(p)} ({prob:.2f})", caption, colour)
        _centred(draw, x + w / 2, above + _line(8), f"true {_short(t)}", caption, colour)
        if files is not None:
            _centred(draw, x + w / 2, y + h + FRAME + 3, _short(Path(files[i]).name, 32), small, "#555555")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG", **PNG)
    return path


def _line(points: float) -> int:
    """Pixels from one text line to the next at this font size."""
    return round(points * DPI / 72 * LINE)


def _font(points: float):
    """matplotlib's default font (DejaVu Sans) at this size for Pillow; Pillow's own font without it."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"),
                                  round(points * DPI / 72))
    except (ImportError, OSError):
        return ImageFont.load_default()


def _centred(draw, x: float, y: float, text: str, font, fill) -> None:
    """One line of text, centred on x, its top at y (pixels)."""
    draw.text((round(x - draw.textlength(text, font=font) / 2), round(y)), text, fill=fill, font=font)


def _mosaic(images: Sequence, wrong: Sequence[bool], cols: int, top: int):
    """(canvas, boxes): a white (height, width, 3) uint8 image with each PIL image scaled to fit a TILE
    box in its CELL (tiny ones by nearest neighbour), framed in red when wrong; boxes: (x, y, w, h) of
    each image in pixels from the top left."""
    from PIL import Image

    rows = -(-len(images) // cols)
    canvas = np.full((top + CELL[1] * rows, CELL[0] * cols, 3), 255, dtype=np.uint8)
    red = np.array([int(WRONG[k:k + 2], 16) for k in (1, 3, 5)], dtype=np.uint8)
    boxes = []
    for i, img in enumerate(images):
        scale = min(TILE / img.width, TILE / img.height)
        w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        resample = Image.NEAREST if min(img.size) < 64 else Image.LANCZOS
        tile = np.asarray(img.convert("RGB").resize((w, h), resample))
        # the TILE box sits under two caption lines and the frame (36 px), over the file name (18 px)
        x = (i % cols) * CELL[0] + (CELL[0] - w) // 2
        y = top + (i // cols) * CELL[1] + 36 + (TILE - h) // 2
        if wrong[i]:
            canvas[y - FRAME:y + h + FRAME, x - FRAME:x + w + FRAME] = red
        canvas[y:y + h, x:x + w] = tile
        boxes.append((x, y, w, h))
    return canvas, boxes


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
