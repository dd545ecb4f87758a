"""Writing caches: the chunk store of unfinished work, the complete-file writer, assembly from computed rows."""
from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import h5py
import numpy as np

from pipeline.cache.h5 import attrs_of, open_h5
from pipeline.cache.key import (ALL_SPLITS, FORMAT_VERSION, H5_ERRORS, ROW_CHUNK, CacheError, SplitManifest,
                                cache_key, damaged, digest, extra_taps, legacy_cache_path, manifest_digest,
                                tap_dataset, write_error)
from pipeline.cache.reader import present_splits, same_data_caches, verify_cache
from pipeline.fsutil import atomic_write_bytes, fsync_dir, publish, remove_stale_temps, temp_path

ASSEMBLE_ROWS = 4096      # rows copied per step when assembling a complete file


@dataclass(frozen=True)
class RowSource:
    """Where a computed feature row already lives: file, dataset and row index."""

    file: Path
    dataset: str
    row: int


def previous_rows(path: Path, config_key: str) -> tuple[dict[str, RowSource], Optional[int]]:
    """sha256 -> row of an intact complete cache at path with this config key (the previous run's rows);
    with no file at path, of the file an older version named for this configuration (legacy_cache_path)."""
    if not path.is_file():
        legacy = legacy_cache_path(path)
        return previous_rows(legacy, config_key) if legacy != path and legacy.is_file() else ({}, None)
    try:
        attrs, manifests = verify_cache(path)
    except CacheError:
        return {}, None
    if attrs["config_key"] != config_key:
        return {}, None
    try:
        check_features(path)
    except CacheError as e:
        print(f"extract: not reusing rows of a damaged cache: {e}")
        return {}, None
    rows: dict[str, RowSource] = {}
    for split, m in manifests.items():
        for i, h in enumerate(m.sha256):
            rows.setdefault(h, RowSource(path, f"{split}/features", i))
    return rows, int(attrs["feature_dim"])


def _taps_cover(theirs: list[str], mine: list[str]) -> bool:
    """A file with taps `theirs` holds every tap of `mine` as mine would compute it (concat: same stage taps)."""
    stages = lambda taps: [t for t in taps if t.startswith("stage-")]  # noqa: E731
    return set(mine) <= set(theirs) and ("concat" not in mine or stages(mine) == stages(theirs))


def rows_of_more_taps(path: Path, config: dict, data_root: str) -> tuple[dict[str, RowSource], Optional[int]]:
    """sha256 -> row of an intact cache next to path, of the same data and feature configuration but more
    taps (backbone.taps narrowed: its rows are copied, no forward pass); ({}, None) when there is none."""
    mine = config.get("taps", ["pool"])
    for other, attrs in same_data_caches(Path(path).parent, data_root):
        versions = attrs["versions"]
        if other == path:
            continue
        theirs = versions.get("taps", ["pool"])
        same = {k: v for k, v in versions.items() if k != "taps"} == {k: v for k, v in config.items() if k != "taps"}
        if same and _taps_cover(theirs, mine):
            rows, dim = previous_rows(other, attrs["config_key"])
            if rows:
                return rows, dim
    return {}, None


def is_intact(path: Path) -> bool:
    """True when path is a complete cache whose structure, rows, key and feature checksums all verify."""
    try:
        verify_cache(path)
        check_features(path)
    except CacheError:
        return False
    return True


def check_features(path: Path, datasets: Optional[Iterable[str]] = None) -> None:
    """Read every feature row once (of datasets; default: every split's features) so HDF5 verifies the
    fletcher32 checksums; CacheError on damage."""
    try:
        with open_h5(path) as f:
            taps = ["pool", *extra_taps(attrs_of(f))]
            for name in datasets or [tap_dataset(f"{s}/features", t) for s in present_splits(f) for t in taps]:
                ds = f[name]
                for start in range(0, ds.shape[0], ASSEMBLE_ROWS):
                    ds[start:start + ASSEMBLE_ROWS]
    except CacheError:
        raise
    except H5_ERRORS as e:
        raise CacheError(f"cannot read features of '{path}': {e}") from None


class ChunkStore:
    """Rows computed by an unfinished extraction: self-contained chunk files in `<name>.partial/`.

    Each chunk file holds `sha256` (k,) and `features` (k, feature_dim) (and `taps/<tap>` (k, D_tap) per
    extra tap) and is renamed into place only once complete, so the folder never holds a torn chunk
    under a real name.
    """

    def __init__(self, folder: Path, config_key: str, dtype: str, taps: Iterable[str] = ()) -> None:
        self.folder = Path(folder)
        self.config_key = config_key
        self.dtype = np.dtype(dtype)
        self.taps = [t for t in taps if t != "pool"]  # stored besides `features` (pipeline.taps)

    def chunk_files(self) -> list[Path]:
        return sorted(self.folder.glob("chunk-*.h5")) if self.folder.is_dir() else []

    def clean(self) -> None:
        """Remove temporary files of dead writers (call with the cache lock held)."""
        if self.folder.is_dir():
            for tmp in self.folder.glob(".chunk-*.tmp"):
                tmp.unlink(missing_ok=True)

    def read_chunk(self, path: Path) -> tuple[list[str], int]:
        """(sha256 of each row, feature_dim) of an intact chunk file; CacheError otherwise."""
        try:
            return self._read_chunk(path)
        except CacheError:
            raise
        except H5_ERRORS as e:
            raise damaged(path, e, "chunk") from None

    def _read_chunk(self, path: Path) -> tuple[list[str], int]:
        with open_h5(path) as f:
            attrs = attrs_of(f)
            if not attrs.get("complete") or attrs.get("config_key") != self.config_key \
                    or attrs.get("format_version") != FORMAT_VERSION:
                raise CacheError(f"chunk '{path}' is incomplete or for another configuration")
            if "sha256" not in f or "features" not in f:
                raise CacheError(f"chunk '{path}' lacks its datasets")
            sha, feats = f["sha256"], f["features"]
            if sha.ndim != 1 or sha.dtype != np.dtype("S64") or feats.ndim != 2 \
                    or feats.shape[0] != sha.shape[0] or feats.dtype != self.dtype:
                raise CacheError(f"chunk '{path}' has an unexpected structure")
            if any(tap_dataset("features", t) not in f or f[tap_dataset("features", t)].shape[0] != sha.shape[0]
                   for t in self.taps):
                raise CacheError(f"chunk '{path}' lacks the datasets of backbone.taps")
            hashes, dim = [h.decode() for h in sha[()]], int(feats.shape[1])
        check_features(path, ("features", *(tap_dataset("features", t) for t in self.taps)))
        return hashes, dim

    def rows(self) -> tuple[dict[str, RowSource], Optional[int]]:
        """sha256 -> row for every intact chunk; damaged ones are deleted (their rows get recomputed)."""
        rows: dict[str, RowSource] = {}
        dim = None
        for path in self.chunk_files():
            try:
                hashes, dim_here = self.read_chunk(path)
            except CacheError as e:
                print(f"extract: discarding {e}")
                path.unlink(missing_ok=True)
                continue
            dim = dim_here
            for i, h in enumerate(hashes):
                rows.setdefault(h, RowSource(path, "features", i))
        return rows, dim

    def write(self, sha256: list[str], features: np.ndarray | dict[str, np.ndarray]) -> Path:
        """Save one chunk: sha256 (k,), features (k, feature_dim) in the storage dtype ({tap: (k, D_tap)}
        with taps: pool is `features`).

        The HDF5 image is built in memory and written with plain file I/O, so a full disk is an
        ordinary OSError rather than a failure inside the HDF5 library.
        """
        path = self.folder / f"chunk-{digest(sha256)[:16]}.h5"
        tapped = features if isinstance(features, dict) else {"pool": features}
        image = io.BytesIO()
        with h5py.File(image, "w") as f:
            f.create_dataset("sha256", data=np.asarray(sha256, dtype="S64"))
            for tap in ["pool", *self.taps]:
                data = tapped[tap]
                f.create_dataset(tap_dataset("features", tap), data=data.astype(self.dtype, copy=False),
                                 chunks=data.shape, fletcher32=True)
            if self.taps:
                f.attrs["taps"] = json.dumps(["pool", *self.taps])
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["config_key"] = self.config_key
            f.attrs["complete"] = True
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, image.getvalue(), tmp=self.folder / f".{path.stem}.{os.getpid()}.tmp")
        except OSError as e:
            raise write_error(self.folder.parent, e) from None
        return path

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# ----------------------------------------------------------------------------- writing
class CacheWriter:
    """Write a cache under a temporary name; `commit` marks it complete and renames it into place.

    Leaving the `with` block without commit (an exception, Ctrl-C) deletes the temporary file and
    leaves any previous cache at `path` untouched.
    """

    def __init__(self, path: str | Path, feature_dim: int, dtype: str, tap_dims: Optional[dict[str, int]] = None) -> None:
        self.path = Path(path)
        self.feature_dim = feature_dim
        self.tap_dims = dict(tap_dims or {})  # {tap: D_tap} stored besides pool as <split>/taps/<tap>
        self.dtype = np.dtype(dtype)
        self.tmp = temp_path(self.path)
        self.manifests: dict[str, SplitManifest] = {}
        self._file: Optional[h5py.File] = None

    def __enter__(self) -> "CacheWriter":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = h5py.File(self.tmp, "w")
        except (OSError, RuntimeError) as e:
            raise write_error(self.path.parent, e) from None
        return self

    def create_split(self, split: str, manifest: SplitManifest) -> None:
        n = len(manifest)
        try:
            g = self._file.create_group(split)
            chunked = {"chunks": (max(1, min(n, ROW_CHUNK)), self.feature_dim), "fletcher32": True} if n else {}
            g.create_dataset("features", shape=(n, self.feature_dim), dtype=self.dtype, **chunked)
            for tap, dim in self.tap_dims.items():
                opts = {"chunks": (max(1, min(n, ROW_CHUNK)), dim), "fletcher32": True} if n else {}
                g.create_dataset(tap_dataset("features", tap), shape=(n, dim), dtype=self.dtype, **opts)
            g.create_dataset("labels", data=np.asarray(manifest.labels, dtype=np.int64))
            g.create_dataset("paths", data=list(manifest.paths), dtype=h5py.string_dtype("utf-8"))
            g.create_dataset("sha256", data=np.asarray(manifest.sha256, dtype="S64"))
        except (OSError, RuntimeError) as e:
            raise write_error(self.path.parent, e) from None
        self.manifests[split] = manifest

    def write_rows(self, split: str, start: int, features: np.ndarray, tap: str = "pool") -> None:
        """features: (batch, feature_dim) (or the tap's (batch, D_tap)) written at rows [start, start + batch)."""
        try:
            ds = self._file[split][tap_dataset("features", tap)]
            ds[start:start + len(features)] = features.astype(self.dtype, copy=False)
        except (OSError, RuntimeError) as e:
            raise write_error(self.path.parent, e) from None

    def commit(self, attrs: dict) -> Path:
        """Record attrs, derive manifest_digest and key from the rows written, mark complete, rename."""
        classes = tuple(attrs["classes"])
        digest_ = manifest_digest(classes, self.manifests)
        key = cache_key(attrs["config_key"], digest_)
        if attrs.get("key", key) != key:
            raise ValueError(f"key {attrs['key']} does not match the rows written ({key})")
        f = self._file
        try:
            for k, v in {**attrs, "manifest_digest": digest_, "key": key, "feature_dim": self.feature_dim,
                         "dtype": self.dtype.name, "format_version": attrs.get("format_version", FORMAT_VERSION),
                         **({"taps": ["pool", *self.tap_dims], "tap_dims": self.tap_dims} if self.tap_dims else {}),
                         }.items():
                f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list, tuple)) else v
            f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            f.attrs["complete"] = True  # last: a file without it is never read as a cache
            f.flush()
            f.close()
            self._file = None
            publish(self.tmp, self.path)
        except (OSError, RuntimeError) as e:
            raise write_error(self.path.parent, e) from None
        return self.path

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except (OSError, RuntimeError):
                pass
            self._file = None
        self.tmp.unlink(missing_ok=True)


def _gather(sources: list[tuple[RowSource, int]], out: np.ndarray, tap: str = "pool") -> None:
    """Copy each (source row, output position) of tap into out, reading each file once, in row order."""
    groups: dict[tuple[Path, str], list[tuple[int, int]]] = defaultdict(list)
    for src, pos in sources:
        groups[(src.file, tap_dataset(src.dataset, tap))].append((src.row, pos))
    for (file, dataset), items in groups.items():
        rows = sorted({r for r, _ in items})
        lo, hi = rows[0], rows[-1] + 1
        dense = hi - lo <= 4 * len(rows)  # one slice beats h5py's slow point selection
        try:
            with open_h5(file) as f:
                block = f[dataset][lo:hi] if dense else f[dataset][rows]
        except OSError as e:
            raise CacheError(f"cannot read features from '{file}': {e}") from None
        index = {r: (r - lo if dense else i) for i, r in enumerate(rows)}
        for r, pos in items:
            out[pos] = block[index[r]]


def _tap_dims(rows: dict[str, RowSource], taps: list[str]) -> dict[str, int]:
    """{tap: D_tap} of the extra taps, read from where the first computed row lives."""
    if not taps or not rows:
        return {}
    src = next(iter(rows.values()))
    with open_h5(src.file) as f:
        return {t: int(f[tap_dataset(src.dataset, t)].shape[1]) for t in taps}


def assemble_cache(path: Path, manifests: dict[str, SplitManifest], feature_dim: int, dtype: str,
                   rows: dict[str, RowSource], attrs: dict, taps: Iterable[str] = ()) -> Path:
    """Write the complete cache at path from rows already computed (previous cache, chunk files).

    Rows are copied in the storage dtype, so every feature is bitwise what was computed. taps: the
    backbone's taps; those besides pool are written as <split>/taps/<tap>.
    """
    missing = [h for m in manifests.values() for h in m.sha256 if h not in rows]
    if missing:
        raise CacheError(f"internal error: {len(missing)} rows have no computed features")
    dims = {"pool": feature_dim, **_tap_dims(rows, [t for t in taps if t != "pool"])}
    with CacheWriter(path, feature_dim, dtype, {t: d for t, d in dims.items() if t != "pool"}) as writer:
        for split in [s for s in ALL_SPLITS if s in manifests]:  # train, val, then test when present
            m = manifests[split]
            writer.create_split(split, m)
            for start in range(0, len(m), ASSEMBLE_ROWS):
                block = m.sha256[start:start + ASSEMBLE_ROWS]
                for tap, dim in dims.items():
                    out = np.empty((len(block), dim), dtype=dtype)
                    _gather([(rows[h], i) for i, h in enumerate(block)], out, tap)
                    writer.write_rows(split, start, out, tap)
        return writer.commit(attrs)


def discard(path: Path) -> None:
    """Delete a damaged complete cache (call with the cache lock held)."""
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)


def remove_stale_files(path: Path) -> None:
    """Temporary files of dead writers next to path (call with the cache lock held)."""
    remove_stale_temps(path.parent, path.name, any_pid=True)


def iter_unique(hashes: Iterable[str]) -> list[str]:
    """Hashes in first-seen order, each once."""
    return list(dict.fromkeys(hashes))

