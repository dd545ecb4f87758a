"""Saving and loading run artifacts (torch checkpoints, joblib models) with recorded SHA-256.

Every artifact is written atomically (temp file, fsync, rename) and its SHA-256 is recorded in a
`SHA256SUMS` file in the same folder (the format `sha256sum -c` reads). Loading checks the file
against that record first: a file this pipeline did not write, or one changed since, is refused
unless the caller passes trust=True (the CLI's --trust). joblib/pickle files can run code when
loaded, so this check comes before any unpickling; torch checkpoints are in addition always
loaded with weights_only=True, never with a fallback to full unpickling.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from pipeline import PipelineError
from pipeline.fsutil import FileLock, atomic_path, atomic_write_bytes, sha256_file

SUMS_FILE = "SHA256SUMS"


class ArtifactError(PipelineError):
    pass


file_sha256 = sha256_file


def read_sums(sums: Path) -> dict[str, str]:
    """name -> sha256 from a SHA256SUMS file ('<hex>  <name>' per line); ArtifactError if it is damaged.

    It is the record of which model files this pipeline wrote, so a damaged one is never replaced
    or skipped silently: the message says how to get a usable record back.
    """
    if not sums.is_file():
        return {}
    fix = ("restore it from a backup, or move it away and train the models again (or load them with "
           "--trust if you know where they came from)")
    try:
        text = sums.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ArtifactError(f"'{sums}' is damaged (not UTF-8 text): {fix}") from None
    out = {}
    for i, line in enumerate(text.splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not (sep and name and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise ArtifactError(f"'{sums}' is damaged (line {i} is not '<sha256>  <file name>'): {fix}")
        out[name] = digest
    return out


_read_sums = read_sums


def sums_text(records: dict[str, str]) -> str:
    """The SHA256SUMS text of name -> sha256 records (the format `sha256sum -c` reads)."""
    return "".join(f"{d}  {n}\n" for n, d in sorted(records.items()))


def record_sha256(path: Path) -> str:
    """Hash path and record it in its folder's SHA256SUMS (replacing an older record of that name)."""
    path = Path(path)
    digest = file_sha256(path)
    sums = path.parent / SUMS_FILE
    with FileLock(path.parent / f".{SUMS_FILE}.lock"):
        records = _read_sums(sums)
        records[path.name] = digest
        atomic_write_bytes(sums, sums_text(records).encode("utf-8"))
    return digest


def recorded_sha256(path: Path) -> Optional[str]:
    path = Path(path)
    return _read_sums(path.parent / SUMS_FILE).get(path.name)


def verify_artifact(path: Path, trust: bool = False) -> None:
    """Raise unless path's bytes match the SHA-256 recorded when this pipeline saved it."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no model file at '{path}': run the stage that trains it first")
    if trust:
        return
    sums = path.parent / SUMS_FILE
    expected = recorded_sha256(path)
    how = "pass --trust (trust=True) only if you know where it came from"
    if expected is None:
        raise ArtifactError(f"refusing to load '{path}': its SHA-256 is not recorded in '{sums}', so this "
                            f"pipeline did not save it there (model files can run code when loaded); {how}")
    actual = file_sha256(path)
    if actual != expected:
        raise ArtifactError(f"refusing to load '{path}': its SHA-256 {actual[:12]}… differs from "
                            f"{expected[:12]}… recorded in '{sums}' when it was saved, so it changed since; "
                            f"retrain it, or {how}")


# The model file each classifier-training stage writes into the run folder.
MODEL_FILES = {"head": "head.pt", "logistic": "logistic.joblib", "finetune": "finetune.pt"}


def _save_recorded(path: Path, dump) -> Path:
    """dump(tmp) into a temporary file, rename it to path atomically, record its SHA-256."""
    path = Path(path)
    with atomic_path(path) as tmp:
        dump(tmp)
    record_sha256(path)
    return path


def save_checkpoint(obj: dict, path: Path) -> Path:
    """torch.save atomically and record the file's SHA-256."""
    return _save_recorded(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: Path, trust: bool = False) -> dict[str, Any]:
    """Verify the recorded SHA-256, then load with weights_only=True: tensors and containers, never code."""
    verify_artifact(path, trust)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file, never a fallback
        raise ArtifactError(f"cannot load '{path}' as a checkpoint: {e}") from None


def save_joblib(obj: Any, path: Path) -> Path:
    """joblib.dump atomically and record the file's SHA-256."""
    import joblib

    return _save_recorded(path, lambda tmp: joblib.dump(obj, tmp))


def load_joblib(path: Path, trust: bool = False) -> Any:
    """Verify the recorded SHA-256 before unpickling: a joblib file can execute code when loaded."""
    import joblib

    verify_artifact(path, trust)
    try:
        return joblib.load(path)
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"cannot load '{path}' as a joblib model: {e}") from None
