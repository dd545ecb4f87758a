"""What every trained head leaves beside its model: val predictions, confused pairs, a test score, a ledger line.

Used by the head, logistic and sweep stages:
- `stage_error_analysis` stages `<kind>_val_predictions.csv` (path, true, predicted, probability,
  correct, top-k) in the stage's publication, so it is published with the model as one unit, and
  returns the most confused class pairs for the metrics entry;
- `test_split`: the cache's optional `test` split (pipeline.selection scores it once for the chosen model);
- `record_heads`: append to `run.output_dir/ledger.jsonl` after the publish (pipeline/ledger.py).

numpy and the standard library only (pipeline.analysis, pipeline.ledger).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from pipeline.analysis import PREDICTIONS_FILE, confused_pairs, prediction_rows, write_predictions_csv
from pipeline.ledger import LEDGER_FILE, LedgerEntry, append_entries

CONFUSED_TOP = 5     # confused pairs kept in metrics.json
PREDICTION_TOP_K = 3  # classes listed per image in val_predictions.csv


def predictions_file(kind: str) -> str:
    """head_val_predictions.csv, logistic_val_predictions.csv: one per model of the run folder."""
    return f"{kind}_{PREDICTIONS_FILE}"


def stage_error_analysis(publication, kind: str, preds) -> dict:
    """Stage the val predictions CSV of preds (a report.Predictions); the metrics entry's additions."""
    rows = prediction_rows(preds.paths, preds.targets, preds.probs, preds.classes, PREDICTION_TOP_K)
    path = write_predictions_csv(publication.staging / predictions_file(kind), rows)
    pairs = confused_pairs(preds.targets, preds.predicted, preds.classes, CONFUSED_TOP)
    return {"val_predictions": str(publication.final_path(path)),
            "confused_pairs": [dataclasses.asdict(p) for p in pairs]}


def confused_text(pairs: Sequence[dict], top: int = 3) -> str:
    """'most confused: daisy as dandelion (3, 15.0%), ...' for the stage's printed summary."""
    if not pairs:
        return "no val image confused"
    return "most confused: " + ", ".join(f"{p['true']} as {p['predicted']} ({p['count']}, {p['fraction']:.1%})"
                                         for p in pairs[:top])


def head_values(head, kind: str) -> dict:
    """The head.* values (a HeadConfig's) of the parameters a probe of type kind takes (probe_config's)."""
    from pipeline.probe_config import param_names

    return {name: getattr(head, name) for name in param_names(kind)}


def test_split(features) -> Optional[Any]:
    """The cache's optional test split (rows with .features, .labels, .paths), or None (none, or no rows)."""
    split = features.test
    return split if split is not None and len(split.labels) else None


def ledger_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / LEDGER_FILE


def ledger_entry(features, head_type: str, params: dict, val_acc: Optional[float],
                 val_mean_per_class: Optional[float], test: dict, seconds: float, run_dir: Path,
                 source: str, n_val: Optional[int] = None) -> LedgerEntry:
    """One ledger line for a head trained on features (a cache.FeatureSet); a tap other than pool is a param.
    n_val, the val images scored, defaults to the cache's val rows."""
    tap = getattr(features, "tap", "pool")
    params = params if tap == "pool" or "tap" in params else {"tap": tap, **params}
    if n_val is None and getattr(features, "manifests", {}).get("val"):
        n_val = len(features.manifests["val"])
    return LedgerEntry(features.key, str(features.backbone.get("name", "")), head_type, params, val_acc,
                       val_mean_per_class, test.get("test_acc"), test.get("test_mean_per_class"), seconds,
                       str(run_dir), source, cache_file=str(features.path), n_val=n_val)


def append_heads(output_dir: str | Path, entries: Sequence[LedgerEntry]) -> Optional[str]:
    """Append to the ledger: None, or the one line that says why it could not be written (the model is saved)."""
    path = ledger_path(output_dir)
    try:
        append_entries(path, list(entries))
    except OSError as e:
        return (f"cannot append to '{path}': {e.strerror} (the trained model is saved; the leaderboard will not "
                "list it)")
    return None


def record_heads(output_dir: str | Path, entries: Sequence[LedgerEntry]) -> None:
    """append_heads; a ledger that cannot be written is one line on stderr."""
    problem = append_heads(output_dir, entries)
    if problem:
        print(f"ledger: {problem}", file=sys.stderr)


def _differs(default: Any, value: Any) -> bool:
    try:
        return bool(default != value)
    except (TypeError, ValueError):     # arrays and other values without one truth value
        return True


def compact_params(params: dict, defaults: dict, keep: Sequence[str] = ()) -> dict:
    """The parameters that differ from defaults (and those in keep): what tells two heads apart."""
    return {k: v for k, v in params.items() if k in keep or k not in defaults or _differs(defaults[k], v)}
