"""The pre-scan's index: what `scan` learnt about each image file, kept while its stat signature holds.

Only a speed-up: a missing, unreadable or foreign index is treated as empty, so every file is
hashed again. Stored as plain arrays through `pipeline.cache.h5` (h5py stays inside the cache package),
sealed with the SHA-256 of its bytes: a damaged index is ignored with a line saying so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.cache.h5 import STRINGS, ChecksumError, read_arrays, write_arrays
from pipeline.cache.key import FORMAT_VERSION, digest
from pipeline.fsutil import remove_stale_temps

STAT_FIELDS = ("dev", "ino", "size", "mtime_ns", "ctime_ns")
NAMES = ("paths", "stat", "sha256", "reason", "detail")
MAGIC = b"scan-index sha256 "  # the start of the user block; the SHA-256 of the rest follows


@dataclass(frozen=True)
class ScanEntry:
    """What the pre-scan learnt about one file, valid while its stat signature is unchanged."""

    stat: tuple[int, ...]      # STAT_FIELDS
    sha256: str                # "" when the file could not be read
    reason: str                # "" for a good image, else a bad-file reason code
    detail: str


def scan_index_path(cache_dir: str | Path, data_root: Path) -> Path:
    return Path(cache_dir) / f"scan-{digest(os.path.realpath(data_root))[:16]}.h5"


def _usable(attrs: dict, shapes: dict) -> bool:
    n = shapes["paths"][0][0] if len(shapes["paths"][0]) == 1 else -1
    return (attrs.get("format_version") == FORMAT_VERSION and shapes["stat"][0] == (n, len(STAT_FIELDS))
            and all(shapes[name][0] == (n,) for name in ("sha256", "reason", "detail")))


def read_scan_index(path: Path) -> dict[str, ScanEntry]:
    """path -> entry of an earlier pre-scan; {} when there is none or it is unusable (it is only a speed-up).

    The whole file is checked against the SHA-256 in its first bytes before HDF5 parses any of it: a
    damaged index (say, one changed character of a stored SHA-256) is ignored, with a line saying so,
    and every image is hashed again.
    """
    try:
        found = read_arrays(path, NAMES, _usable, checksum=MAGIC)
    except ChecksumError:
        print(f"extract: the scan index '{path}' failed its checksum (damaged or older); hashing every image again")
        return {}
    if found is None:
        return {}
    stats, shas, reasons, details = found["stat"], found["sha256"], found["reason"], found["detail"]
    return {p.decode(): ScanEntry(tuple(int(v) for v in stats[i]), shas[i].decode(), reasons[i].decode(),
                                  details[i].decode()) for i, p in enumerate(found["paths"])}


def write_scan_index(path: Path, entries: dict[str, ScanEntry]) -> None:
    """Replace the scan index atomically; raises OSError (callers treat it as optional).

    Built in memory and written with plain file I/O, like chunks: a full disk cannot leave the HDF5
    library with a half-closed file. The HDF5 user block holds MAGIC and the SHA-256 of the rest.
    """
    names = sorted(entries)
    arrays = {"paths": names,
              "stat": np.asarray([entries[p].stat for p in names], dtype=np.int64).reshape(len(names), len(STAT_FIELDS)),
              "sha256": np.asarray([entries[p].sha256 for p in names], dtype="S64"),
              "reason": [entries[p].reason for p in names], "detail": [entries[p].detail for p in names]}
    strings = {"dtype": STRINGS}
    write_arrays(path, arrays, {"format_version": FORMAT_VERSION},
                 {"paths": strings, "reason": strings, "detail": strings}, checksum=MAGIC)


def remove_stale_scan_temps(path: Path) -> None:
    remove_stale_temps(path.parent, path.name)
