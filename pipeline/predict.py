"""Stage `predict`: classify new images (files or folders) with a saved model; print or write CSV."""
from __future__ import annotations

import csv
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline import PipelineError
from pipeline.config import Config
from pipeline.data import IGNORED_NAMES, eval_transform, find_images, load_image
from pipeline.fsutil import atomic_path, temp_path
from pipeline.predictor import Predictor, load_predictor


@dataclass
class ImagePrediction:
    path: str                                   # as the user gave it (or found in a given folder)
    top: list[tuple[str, float]]                # (class, probability), most probable first; [] if failed
    error: Optional[str] = None
    true: Optional[str] = None                  # its class folder's name, in a labelled folder

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def label(self) -> Optional[str]:
        """The predicted class (None when the file could not be read)."""
        return self.top[0][0] if self.top else None

    @property
    def probability(self) -> Optional[float]:
        """The predicted class's probability (None when the file could not be read)."""
        return self.top[0][1] if self.top else None


def collect_images(paths: Sequence[str]) -> tuple[list[tuple[str, Optional[str]]], int]:
    """((path, error) in the order given: files as named (any extension: the user chose them), the image
    files inside folders (recursively, sorted), and an error for a path that is missing or holds no images;
    how many files were left out because an earlier path already named the same file (a file and its
    folder, a folder twice): each is classified and scored once). A link is a file of its own, as in a
    dataset that links one photo into two class folders."""
    out: list[tuple[str, Optional[str]]] = []
    seen: set[str] = set()

    def add(path: str, error: Optional[str]) -> int:
        key = os.path.abspath(path) if error is None else path
        if key in seen:
            return 1
        seen.add(key)
        out.append((path, error))
        return 0

    repeated = 0
    for text in paths:
        p = Path(text)
        if p.is_dir():
            found = find_images(p)
            repeated += sum(add(str(f), None) for f in found) if found else add(text, "folder has no image files")
        elif p.exists():
            repeated += add(text, None)
        else:
            repeated += add(text, "no such file or folder")
    return out, repeated


class _Images(Dataset):
    """(tensor or None, error or None) per file: a bad file becomes a row, never an exception."""

    def __init__(self, files: Sequence[str], transform) -> None:
        self.files, self.transform = list(files), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return self.transform(load_image(self.files[i])), None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return None, f"cannot read image: {e.strerror if isinstance(e, OSError) and e.strerror else e}"


def folder_labels(paths: Sequence[str], found: Sequence[tuple[str, Optional[str]]],
                  classes: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """True classes of images in labelled folders (ImageFolder layout: folder/<class>/...), and one line
    per folder whose class folders the model does not know.

    A given folder is labelled when at least one of its sub-folders is named after one of the model's
    classes; its images under such a sub-folder get that class, the rest are left unscored.
    """
    known, labels, notes = set(classes), {}, []
    for text in paths:
        folder = Path(text)
        try:
            subs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                          and p.name not in IGNORED_NAMES) if folder.is_dir() else []
        except OSError:  # an unreadable folder is already a row with its error
            continue
        if not known & set(subs):
            continue
        unknown = [name for name in subs if name not in known]
        if unknown:
            notes.append(f"predict: '{display_path(text)}' has class folders the model does not know: "
                         f"{', '.join(display_path(u) for u in unknown)} (its classes: {', '.join(classes)}); "
                         "their images are classified but not scored")
        for path, _ in found:
            rel = Path(path).relative_to(folder) if Path(path).is_relative_to(folder) else None
            if rel is not None and len(rel.parts) > 1 and rel.parts[0] in known:
                labels[path] = rel.parts[0]
    return labels, notes


def labelled_scores(rows: Sequence[ImagePrediction], classes: Sequence[str], top: int = 5) -> Optional[tuple]:
    """(analysis.score_labels' dict, the top most confused pairs) over the readable rows that have a true
    class; None when there are none."""
    from pipeline.analysis import confused_pairs, score_labels

    scored = [r for r in rows if r.ok and r.true is not None]
    if not scored:
        return None
    index = {c: i for i, c in enumerate(classes)}
    y_true = [index[r.true] for r in scored]
    y_pred = [index[r.label] for r in scored]
    return score_labels(y_true, y_pred), confused_pairs(y_true, y_pred, classes, top)


def labelled_summary(rows: Sequence[ImagePrediction], classes: Sequence[str], top: int = 5) -> Optional[str]:
    """Top-1 and mean per-class accuracy side by side, and the most confused pairs (labelled_scores), as
    predict prints them; None when no row has a true class."""
    from pipeline.analysis import format_confused_pairs

    scores = labelled_scores(rows, classes, top)
    if scores is None:
        return None
    s, pairs = scores
    return (f"predict: top-1 {s['acc']:.4f}, mean per-class {s['mean_per_class']:.4f} on {s['n']} labelled "
            f"images\nmost confused pairs:\n{format_confused_pairs(pairs)}")


def _keep_errors(batch):
    return batch  # a list of (tensor | None, error | None); stacked by classify_files


def top_k(probs: np.ndarray, classes: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """For each row of (n_images, num_classes) probabilities, the k most probable (class, p), stable order."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(classes[j], float(row[j])) for j in idx] for row, idx in zip(probs, order)]


def classify_files(predictor: Predictor, files: Sequence[str], batch_size: int, k: int,
                   num_workers: int = 0) -> list[ImagePrediction]:
    """Predictions for files in order; unreadable ones carry their error."""
    loader = DataLoader(_Images(files, eval_transform(predictor.preprocess)), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, collate_fn=_keep_errors)
    out: list[ImagePrediction] = []
    start = 0
    for batch in loader:
        good = [i for i, (x, _) in enumerate(batch) if x is not None]
        tops = top_k(predictor.probs_from_images(torch.stack([batch[i][0] for i in good])), predictor.classes,
                     min(k, len(predictor.classes))) if good else []
        by_index = dict(zip(good, tops))
        for i, (_, error) in enumerate(batch):
            out.append(ImagePrediction(files[start + i], by_index.get(i, []), error))
        start += len(batch)
    return out


def format_predictions(rows: Sequence[ImagePrediction]) -> str:
    """A plain-text table: path, (true class, when any row has one), top class, its probability, the top-k."""
    labelled = any(r.true is not None for r in rows)
    table = [("path",) + (("true",) if labelled else ()) + ("class", "probability", "top-k")]
    for r in rows:
        true = ((r.true or "-",) if labelled else ())
        if r.ok:
            table.append((display_path(r.path),) + true + (r.label, f"{r.probability:.4f}",
                                                          ", ".join(f"{c} {p:.3f}" for c, p in r.top)))
        else:
            table.append((display_path(r.path),) + true + ("-", "-", f"ERROR {r.error}"))
    n = len(table[0]) - 1
    widths = [max(len(row[i]) for row in table) for i in range(n)]
    lines = ["  ".join([c.ljust(w) for c, w in zip(row[:n], widths)] + [row[n]]) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 5)
    return "\n".join(lines)


def check_output(path: Path) -> None:
    """Refuse an --output the CSV cannot be written to, before any image is classified."""
    path = Path(path)
    if not path.parent.is_dir():
        raise PipelineError(f"--output '{path}': folder '{path.parent}' does not exist")
    if path.is_dir():
        raise PipelineError(f"--output '{path}' is a folder: name a CSV file, e.g. {path / 'predictions.csv'}")
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):
        raise PipelineError(f"--output '{path}' is not a regular file (a device or fifo): name a CSV file")
    probe = temp_path(path)
    try:
        probe.open("x").close()
        probe.unlink()
    except OSError as e:
        raise PipelineError(f"--output '{path}': cannot write in folder '{path.parent}' ({e.strerror}); "
                            "choose a writable folder") from None


def display_path(path: str) -> str:
    """A file name as text that any terminal can print (a non-UTF-8 byte shows as U+FFFD)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def write_csv(rows: Sequence[ImagePrediction], k: int, path: Path) -> Path:
    """path, status, class_1, prob_1, ..., class_k, prob_k, error, true (the class folder; '' if unlabelled)."""
    path = Path(path)
    check_output(path)
    header = ["path", "status"] + [f"{name}_{i}" for i in range(1, k + 1) for name in ("class", "prob")] + [
        "error", "true"]
    try:
        # surrogateescape: a file name that is not UTF-8 is written back as its own bytes, so the CSV
        # names the file that exists; written under a temporary name, so a failure leaves no half CSV.
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for r in rows:
                cells = [v for c, p in r.top for v in (c, f"{p:.6f}")]
                cells += [""] * (2 * k - len(cells))
                writer.writerow([r.path, "ok" if r.ok else "error"] + cells + [r.error or "", r.true or ""])
    except OSError as e:
        raise PipelineError(f"--output '{path}': cannot write the CSV ({e.strerror}); the predictions "
                            "are printed above") from None
    return path


def predict_paths(predictor: Predictor, paths: Sequence[str], batch_size: int, k: int,
                  num_workers: int = 0) -> tuple[list[ImagePrediction], list[str]]:
    """Rows for the given files and folders in order (errors included, true classes from labelled
    folders), and the lines about class folders the model does not know."""
    found, repeated = collect_images(paths)
    files = [p for p, error in found if error is None]
    done = iter(classify_files(predictor, files, batch_size, k, num_workers))
    rows = [next(done) if error is None else ImagePrediction(p, [], error) for p, error in found]
    labels, notes = folder_labels(paths, found, predictor.classes)
    if repeated:
        notes.insert(0, f"predict: {repeated} {'file was' if repeated == 1 else 'files were'} named more than once "
                        "(a file and a folder holding it, or a folder twice): each is classified and scored once")
    for r in rows:
        r.true = labels.get(r.path)
    return rows, notes


def run_predict(cfg: Config, device: torch.device, paths: Sequence[str], output: Optional[str] = None) -> list[ImagePrediction]:
    if not paths:
        raise PipelineError("predict needs image files or folders: python run_pipeline.py predict IMG [IMG ...]")
    if output:
        check_output(Path(output))  # before minutes of work, not after
    predictor = load_predictor(cfg.run_dir, cfg.predict.model, device, trust=cfg.run.trust_artifacts)
    rows, notes = predict_paths(predictor, paths, cfg.predict.batch_size, cfg.predict.top_k, cfg.data.num_workers)
    k = min(cfg.predict.top_k, len(predictor.classes))
    print(f"predict: {cfg.predict.model} model of {cfg.run_dir} ({len(predictor.classes)} classes), "
          f"{sum(r.ok for r in rows)} of {len(rows)} images classified")
    print(format_predictions(rows))
    for line in notes:
        print(line)
    summary = labelled_summary(rows, predictor.classes)
    if summary:
        print(summary)
    if output:
        print(f"predict: wrote {write_csv(rows, k, Path(output))}")
    if not any(r.ok for r in rows):
        raise PipelineError("predict: no image could be read (see the errors above)")
    return rows
