"""Saving and loading run artifacts: torch checkpoints (weights_only) and versions."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pipeline import PipelineError


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
