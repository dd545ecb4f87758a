"""What is in the cache folder: one entry per cache file, with its data, backbone, rows, size and date.

`python run_pipeline.py caches` prints this, so that a cache nobody needs any more is easy to find
and remove. Reads attributes and dataset shapes only (no feature, no checksum): it is instant.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.cache.key import CacheError, cache_path, extra_taps, partial_dir
from pipeline.cache.reader import feature_shapes, read_attrs

SIDE_FILES = ("scan-",)  # the pre-scan's stat index, one per data folder: not a feature cache


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    status: str                  # complete | incomplete or damaged
    data_root: str               # as recorded at extraction ('' when unreadable)
    backbone: str
    rows: Optional[int]          # images over all splits
    size_bytes: int              # the file, its view banks and unfinished chunks
    created: str                 # when it was written (the file's mtime when not recorded)
    old_name: bool               # named as before datasets had their own files
    taps: tuple[str, ...] = ("pool",)  # the feature sets it holds (backbone.taps)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _entry(path: Path) -> CacheEntry:
    attrs = read_attrs(path)
    backbone = (attrs or {}).get("backbone")
    rows = None
    if attrs is not None:
        try:
            rows = sum(n for n, _ in feature_shapes(path).values())
        except CacheError:  # a damaged file is listed as such, never a crash
            attrs = None
    related = sum(p.stat().st_size for p in path.parent.glob(f"{path.stem}.views-*.h5"))
    created = (attrs or {}).get("created") or time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(path.stat().st_mtime))
    return CacheEntry(path, "complete" if attrs is not None else "incomplete or damaged",
                      str((attrs or {}).get("data_root", "")),
                      backbone.get("name", "?") if isinstance(backbone, dict) else "?", rows,
                      path.stat().st_size + related + _folder_bytes(partial_dir(path)), str(created),
                      _old_name(path, attrs), ("pool", *extra_taps(attrs or {})))


def _old_name(path: Path, attrs: Optional[dict]) -> bool:
    """Whether path is named as before datasets had their own files: <backbone>-<config_key[:16]>.h5."""
    backbone = (attrs or {}).get("backbone")
    if not isinstance(backbone, dict) or not isinstance((attrs or {}).get("config_key"), str):
        return False
    return path.name == cache_path(path.parent, str(backbone.get("name", "")), attrs["config_key"]).name


def list_caches(cache_dir: str | Path) -> list[CacheEntry]:
    """Every feature cache file in cache_dir (view banks and the scan index counted with their cache), newest first."""
    folder = Path(cache_dir)
    if not folder.is_dir():
        return []
    files = [p for p in folder.glob("*.h5") if not p.name.startswith(SIDE_FILES) and ".views-" not in p.name
             and not p.name.startswith(".")]
    entries = [_entry(p) for p in files]
    return sorted(entries, key=lambda e: e.created, reverse=True)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_caches(entries: list[CacheEntry], cache_dir: str | Path) -> str:
    """A plain-text table of list_caches, with the total and how to remove one."""
    if not entries:
        return f"caches: no feature cache in '{cache_dir}' (extract.cache_dir)"
    rows = [("file", "data root", "backbone", "images", "size", "created")]
    for e in entries:
        note = " (old name)" if e.old_name else "" if e.status == "complete" else f" ({e.status})"
        taps = f" (taps {', '.join(e.taps)})" if e.taps != ("pool",) else ""
        rows.append((e.path.name + note, e.data_root or "-", e.backbone + taps, "-" if e.rows is None else str(e.rows),
                     _size(e.size_bytes), e.created))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total = sum(e.size_bytes for e in entries)
    lines.append(f"{len(entries)} cache file(s), {_size(total)} in '{cache_dir}'. To remove one: delete the .h5 "
                 f"file with its .views-*.h5 files and .partial{os.sep} folder, e.g. "
                 f"rm -r {Path(cache_dir) / entries[-1].path.stem}.*")
    return "\n".join(lines)
