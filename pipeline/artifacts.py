"""Saving and loading run artifacts: torch checkpoints (weights_only) and joblib models.

Every artifact of a run goes through these four functions, so that checks on artifact files
live in one place.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pipeline import PipelineError

# The model file each classifier-training stage writes into the run folder.
MODEL_FILES = {"head": "head.pt", "logistic": "logistic.joblib", "finetune": "finetune.pt"}


def save_checkpoint(obj: dict, path: Path) -> Path:
    """torch.save atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True: tensors and plain containers, never code."""
    if not Path(path).is_file():
        raise PipelineError(f"no model file at '{path}': run the stage that trains it first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file, never a fallback
        raise PipelineError(f"cannot load '{path}' as a checkpoint: {e}") from None


def save_joblib(obj: Any, path: Path) -> Path:
    """joblib.dump atomically (temp file + rename), for scikit-learn models."""
    import joblib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        joblib.dump(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_joblib(path: Path) -> Any:
    """Load a joblib file written by save_joblib.

    joblib files are pickles: they can run code when loaded, so load only files this tool wrote.
    """
    import joblib

    if not Path(path).is_file():
        raise PipelineError(f"no model file at '{path}': run the stage that trains it first")
    try:
        return joblib.load(path)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        raise PipelineError(f"cannot load '{path}' as a joblib model: {e}") from None
