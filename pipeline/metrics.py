"""The run folder's metrics.json: every stage merges its own entry; the results table reads it."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

METRICS_FILE = "metrics.json"
# The one wording of the leaderboard, the benchmark table and its chart for what their figures are (the
# results table names its test columns instead: _selection_note).
HEADLINE = "test is the headline figure: each model was scored once on test, after it was chosen on val"
NO_TEST = "no test split was scored"
BEST_EPOCH = "val (best epoch)"    # selected_on of a model whose best epoch was chosen on val


def also_selected(figures: str = "these val figures were") -> str:
    """What a table without a test split says of its val figures: `figures` names them ('val_acc of head was')."""
    return (f"{figures} also used for selection ({NO_TEST}), so optimistic: add a test/ folder (or "
            "data.test_fraction) for a figure nothing was chosen on")


def selection_note(tested: bool, ranked: str = "") -> str:
    """The note under a table of models: HEADLINE with a test split, else also_selected(); ranked: how it is sorted."""
    lead = f"{ranked}; " if ranked else ""
    return lead + (HEADLINE if tested else also_selected())


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a crash never leaves a half-written file under the real name, and a
    failed write (full disk, read-only folder) leaves no temporary file and says so in one line."""
    from pipeline import PipelineError
    from pipeline.fsutil import temp_path

    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        raise PipelineError(f"cannot write '{path}': {e.strerror} (free disk space or make the folder "
                            "writable; the previous file is unchanged)") from None
    finally:
        tmp.unlink(missing_ok=True)


def read_metrics(run_dir: Path) -> dict:
    """The run folder's metrics.json ({} if none); a damaged one is an error that says what to do."""
    from pipeline import PipelineError

    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return {}
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        reason = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else f"not JSON: {e}"
        metrics = None
    else:
        reason = "not a JSON object of stage entries"
    if not isinstance(metrics, dict) or not all(isinstance(v, dict) for v in metrics.values()):
        raise PipelineError(f"'{path}' is damaged ({reason}): it records this run folder's results, so it "
                            f"is not replaced silently; move it away (or delete it) and run the stages again")
    return metrics


def update_metrics(run_dir: Path, stage: str, entry: dict) -> dict:
    """Replace this stage's entry in metrics.json, keeping the other stages' entries."""
    from pipeline.rundir import publish_lock

    with publish_lock(run_dir):  # no publish of another stage's entry in between
        metrics = read_metrics(run_dir)
        metrics[stage] = entry
        write_json(Path(run_dir) / METRICS_FILE, metrics)
    return metrics


def per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> list[Optional[float]]:
    """Accuracy on each class's own samples (its recall); None for a class with no samples.

    y_true, y_pred : int arrays of shape (n_samples,)
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.shape} targets but {y_pred.shape} predictions")
    out: list[Optional[float]] = []
    for c in range(num_classes):
        mine = y_true == c
        out.append(float((y_pred[mine] == c).mean()) if mine.any() else None)
    return out


def mean_per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: Optional[int] = None) -> float:
    """The unweighted mean of per-class accuracies over the classes present in y_true.

    Unlike top-1 accuracy it gives a rare class the same weight as a common one.
    """
    y_true = np.asarray(y_true)
    if y_true.size == 0:
        raise ValueError("mean per-class accuracy of no samples")
    n = int(num_classes if num_classes is not None else max(int(y_true.max()), int(np.max(y_pred))) + 1)
    present = [a for a in per_class_accuracy(y_true, y_pred, n) if a is not None]
    return float(np.mean(present))


def _fmt(v: Any, spec: str = ".4g") -> str:
    """One value for the table; figures are stored at full precision and rounded only here."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def selected_on(entry: dict) -> Optional[str]:
    """What chose a stage's model, from its metrics entry: its "selected_on", else "val (best epoch)" when
    it kept a best epoch, else None."""
    return entry.get("selected_on") or (BEST_EPOCH if "best_epoch" in entry else None)


def _chose_on_val(entry: dict) -> bool:
    """Whether a stage's val figure also chose its model (a best epoch or a winner picked on val)."""
    return str(selected_on(entry)).startswith("val")


def _details(stage: str, m: dict) -> str:
    if stage == "extract":
        leaks = m.get("leaked_images")
        return (f"{m.get('images')} images, cache {'hit' if m.get('cache_hit') else 'miss'}"
                + (f", {m['images_per_second']:.1f} img/s" if m.get("images_per_second") else "")
                + (f", {leaks} image(s) in more than one split" if leaks else "")
                + (f", {m.get('train_views')} views per train image built in {m['views_seconds']:.1f} s"
                   if m.get("views_built") and m.get("views_seconds") is not None else ""))
    trained = ", ".join(f"{k}={_fmt(m[k])}" for k in ("best_epoch", "C", "epochs") if k in m)
    if m.get("source") == "sweep":  # head.pt is the sweep's winner, not a head trained with head.*
        sweep = m.get("sweep") or {}
        params = sweep.get("winner") or ", ".join(f"{k}={_fmt(v)}" for k, v in (m.get("params") or {}).items())
        return (f"sweep winner of {sweep.get('finished', '?')} configurations: {m.get('head_type')} ({params})"
                + (f", {trained}" if trained else ""))
    return trained


def _selection_note(metrics: dict, tested: bool) -> str:
    chose = [s for s, m in metrics.items() if s != "extract" and _chose_on_val(m)]
    if tested:
        also = f"; val_acc also chose {', '.join(chose)}" if chose else ""
        return ("test_acc (top-1) and test_per_class (mean per-class accuracy) are the headline: each model was "
                f"scored once on test, after it was chosen{also}")
    if not chose:
        return ""
    return also_selected(f"val_acc of {', '.join(chose)} was")


def format_results(metrics: dict, earlier: Sequence[str] = ()) -> str:
    """A plain-text table of the stages in metrics.json; test figures lead when any stage has them. Stages
    in earlier (entries the run that prints the table did not change) say so in their details."""
    metrics = {s: m for s, m in metrics.items() if isinstance(m, dict)}
    tested = any(m.get("test_acc") is not None for s, m in metrics.items() if s != "extract")
    head = ("stage",) + (("test_acc", "test_per_class") if tested else ()) + ("val_acc", "seconds", "details")
    rows = [head]
    for stage, m in metrics.items():
        test = (_fmt(m.get("test_acc"), ".4f"), _fmt(m.get("test_mean_per_class"), ".4f")) if tested else ()
        details = _details(stage, m) + (" (from an earlier run)" if stage in earlier else "")
        rows.append((stage, *test, _fmt(m.get("val_acc"), ".4f"), _fmt(m.get("seconds"), ".1f"), details))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    note = _selection_note(metrics, tested)
    return "\n".join(lines + ([f"note: {note}"] if note else []))
