"""The HDF5 feature cache: the only module that imports h5py.

What is cached, and under which name
------------------------------------
One complete cache file per *feature configuration*, named by its config key::

    <cache_dir>/<backbone>-<config_key[:16]>.h5

The config key is the SHA-256 of `extract.feature_config()`: cache format version, backbone,
weights identity (the weights file's SHA-256 where there is a file), feature cut, every
preprocessing parameter, storage dtype and torch/torchvision major.minor. The rows inside are
the images: each row is (path relative to the data root, label, SHA-256 of the image's bytes).
The full key is SHA-256(config key, digest of classes + every row), stored in the attributes.

Layout of a complete file::

    /<split>/features   (n_samples, feature_dim) float32|float16, chunked, fletcher32 checksums
    /<split>/labels     (n_samples,) int64, index into the 'classes' attribute
    /<split>/paths      (n_samples,) utf-8, relative to the data root
    /<split>/sha256     (n_samples,) the image file's SHA-256, hex
    attrs: format_version, key, config_key, manifest_digest, classes, backbone, preprocess,
           feature_dim, dtype, data_root, versions, environment, seed, created, complete (last)

Every open checks the structure (dataset names, dtypes, shapes) before reading data, then the
key: the stored rows must hash to `manifest_digest` and (config key, manifest_digest) to `key`.
A file that fails any check is a miss, never reused.

Crash safety: complete files are written under a temporary name, marked complete last, fsynced
and renamed into place. Work in progress lives apart, in `<name>.partial/`: self-contained chunk
files (`chunk-<digest>.h5`: sha256 + features of up to `extract.chunk_size` images), each also
written to a temporary name and renamed, so `kill -9` loses at most the chunk being computed and
never leaves a file a reader could take as complete. Features depend only on an image's bytes,
so chunks and the previous complete file are content-addressed pools: a rerun (after a crash, or
after images were added, removed, renamed or relabelled) copies every row it can find there
bitwise and runs the backbone only on the rest. `<name>.lock` (fcntl.flock, released by the
kernel when its holder dies) keeps a second writer out.

Scale-out: chunk files never share a writer and are named by their content, so several processes
can later fill one `<name>.partial/` with disjoint chunks (one lock per shard) and any one of them
can assemble the complete file once every row is present.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import h5py
import numpy as np

from pipeline import PipelineError
from pipeline.fsutil import sha256_file, atomic_path, atomic_write_bytes, fsync_dir, publish, remove_stale_temps, temp_path

FORMAT_VERSION = 2
SPLITS = ("train", "val")
ROW_CHUNK = 256           # HDF5 chunk rows of a complete file's features
ASSEMBLE_ROWS = 4096      # rows copied per step when assembling a complete file
FEATURE_DTYPES = (np.dtype("float32"), np.dtype("float16"))
STAT_FIELDS = ("dev", "ino", "size", "mtime_ns", "ctime_ns")


class CacheError(PipelineError):
    pass


# What h5py raises on a damaged file, depending on which byte is damaged (a flipped byte in a B-tree
# node, a heap or an attribute gives KeyError, OSError, UnicodeDecodeError, ...): all mean "damaged".
H5_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError, IndexError)


def damaged(path: Path, e: BaseException, what: str = "cache") -> CacheError:
    """One line naming the damaged file (the caller discards and rebuilds it)."""
    return CacheError(f"cannot read {what} '{path}': damaged or unreadable ({type(e).__name__}: {e})")


def digest(obj) -> str:
    """SHA-256 of a JSON-serialisable object in canonical form."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


hash_file = sha256_file  # the image bytes' SHA-256: a row's identity


@dataclass(frozen=True)
class SplitManifest:
    """The rows of one split, in order: what image, what label, what bytes."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]
    sha256: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def rows(self) -> set[tuple[str, int, str]]:
        return set(zip(self.paths, self.labels, self.sha256))


def build_manifest(root: Path, paths: tuple[str, ...], labels: tuple[int, ...]) -> SplitManifest:
    """Hash every image's bytes so that an edited file can never reuse stale features."""
    return SplitManifest(tuple(paths), tuple(labels), tuple(hash_file(Path(root) / p) for p in paths))


def manifest_digest(classes: tuple[str, ...], manifests: dict[str, SplitManifest]) -> str:
    return digest({"classes": list(classes),
                   **{s: [list(m.paths), list(m.labels), list(m.sha256)] for s, m in manifests.items()}})


def cache_key(config_key: str, manifest: str) -> str:
    return hashlib.sha256(f"{config_key}:{manifest}".encode()).hexdigest()


def cache_path(cache_dir: str | Path, backbone: str, config_key: str) -> Path:
    """One file per feature configuration; the image list is checked inside it."""
    return Path(cache_dir) / f"{backbone}-{config_key[:16]}.h5"


def partial_dir(path: Path) -> Path:
    """Resumable work for the cache at path: chunk files of an unfinished extraction."""
    return path.with_name(path.stem + ".partial")


def lock_path(path: Path) -> Path:
    return path.with_name(path.stem + ".lock")


def write_error(folder: Path, e: Exception) -> CacheError:
    """A clear error for a failed write (disk full, read-only folder), whether from the OS or from HDF5."""
    blocker = next((p for p in (Path(folder), *Path(folder).parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():  # not a full disk: a file where a folder should be
        return CacheError(f"cannot write to cache folder '{folder}': '{blocker}' is a file, not a folder; "
                          "move it away or set extract.cache_dir to a folder")
    code = getattr(e, "errno", None)
    if not code:  # HDF5 reports the OS error inside its own multi-line text
        found = re.search(r"errno = (\d+)", str(e))
        code = int(found.group(1)) if found else None
    why = os.strerror(code) if code else str(e).splitlines()[0]
    return CacheError(f"cannot write to cache folder '{folder}': {why}. Free disk space or make the folder "
                      "writable, or set extract.cache_dir to another folder; any previous cache is untouched")


# ----------------------------------------------------------------------------- reading
@dataclass
class CachedSplit:
    features: np.ndarray   # (n_samples, feature_dim)
    labels: np.ndarray     # (n_samples,) int64
    paths: list[str]
    sha256: list[str] = field(default_factory=list)


class _Splits:
    """`train`, `val` and `feature_dim` of a cache whose `splits` and `attrs` are set (loaded or streamed)."""

    splits: dict
    attrs: dict

    @property
    def train(self):
        return self.splits["train"]

    @property
    def val(self):
        return self.splits["val"]

    @property
    def feature_dim(self) -> int:
        return int(self.attrs["feature_dim"])


@dataclass
class FeatureCache(_Splits):
    path: Path
    attrs: dict
    classes: tuple[str, ...]
    splits: dict[str, CachedSplit]


JSON_ATTRS = ("classes", "backbone", "preprocess", "versions", "environment")


def _attrs(f: h5py.File) -> dict:
    out = {}
    for k, v in f.attrs.items():
        out[k] = v.item() if isinstance(v, np.generic) else v
    for k in JSON_ATTRS:
        if isinstance(out.get(k), str):
            try:
                out[k] = json.loads(out[k])
            except ValueError:
                pass  # reported by _check_attrs
    return out


def _check_attrs(attrs: dict, path: Path) -> None:
    """The attributes a complete file must have, with their types."""
    if not attrs.get("complete"):
        raise CacheError(f"cache '{path}' is incomplete (no completion marker); run the extract stage again")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"cache '{path}' has format {attrs.get('format_version')}, this version reads "
                         f"{FORMAT_VERSION}; run the extract stage again")
    for name in ("key", "config_key", "manifest_digest"):
        if not isinstance(attrs.get(name), str):
            raise CacheError(f"cache '{path}' has no valid '{name}' attribute")
    classes = attrs.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise CacheError(f"cache '{path}' has no valid 'classes' attribute")
    dim = attrs.get("feature_dim")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise CacheError(f"cache '{path}' has no valid 'feature_dim' attribute")


def _check_structure(f: h5py.File, path: Path, feature_dim: int) -> None:
    """Dataset names, dtypes and shapes are what this module writes, before any data is read."""
    for split in SPLITS:
        if split not in f or not isinstance(f[split], h5py.Group):
            raise CacheError(f"cache '{path}' has no '{split}' group")
        g = f[split]
        for name in ("features", "labels", "paths", "sha256"):
            if name not in g or not isinstance(g[name], h5py.Dataset):
                raise CacheError(f"cache '{path}' has no dataset '{split}/{name}'")
        n = g["labels"].shape[0] if g["labels"].ndim == 1 else -1
        feats = g["features"]
        if feats.shape != (n, feature_dim) or feats.dtype not in FEATURE_DTYPES:
            raise CacheError(f"cache '{path}': '{split}/features' has shape {feats.shape} dtype {feats.dtype}, "
                             f"expected ({n}, {feature_dim}) float32 or float16")
        if g["labels"].dtype.kind not in "iu":
            raise CacheError(f"cache '{path}': '{split}/labels' has dtype {g['labels'].dtype}, expected integers")
        if g["paths"].shape != (n,) or h5py.check_string_dtype(g["paths"].dtype) is None:
            raise CacheError(f"cache '{path}': '{split}/paths' is not {n} strings")
        if g["sha256"].shape != (n,) or g["sha256"].dtype != np.dtype("S64"):
            raise CacheError(f"cache '{path}': '{split}/sha256' is not {n} 64-character hashes")


def _read_manifests(f: h5py.File) -> dict[str, SplitManifest]:
    return {s: SplitManifest(tuple(p.decode() for p in f[s]["paths"][()]),
                             tuple(int(v) for v in f[s]["labels"][()]),
                             tuple(h.decode() for h in f[s]["sha256"][()])) for s in SPLITS}


def _verify_open(f: h5py.File, path: Path, key: Optional[str]) -> tuple[dict, dict[str, SplitManifest]]:
    """Attributes, structure, then the rows against manifest_digest and the key; raise CacheError."""
    try:
        return _verify_open_unchecked(f, path, key)
    except CacheError:
        raise
    except H5_ERRORS as e:
        raise damaged(path, e) from None


def _verify_open_unchecked(f: h5py.File, path: Path, key: Optional[str]) -> tuple[dict, dict[str, SplitManifest]]:
    attrs = _attrs(f)
    _check_attrs(attrs, path)
    _check_structure(f, path, attrs["feature_dim"])
    manifests = _read_manifests(f)
    n_classes = len(attrs["classes"])
    for split, m in manifests.items():
        if any(not 0 <= label < n_classes for label in m.labels):
            raise CacheError(f"cache '{path}': '{split}/labels' has values outside 0..{n_classes - 1}")
    if manifest_digest(tuple(attrs["classes"]), manifests) != attrs["manifest_digest"]:
        raise CacheError(f"cache '{path}': its rows (paths, labels, sha256) do not match the recorded "
                         "manifest digest; it was modified after it was written")
    if cache_key(attrs["config_key"], attrs["manifest_digest"]) != attrs["key"]:
        raise CacheError(f"cache '{path}': its key does not match its configuration and rows")
    if key is not None and attrs["key"] != key:
        raise CacheError(f"cache '{path}' does not match the current data and backbone; "
                         "run the extract stage again")
    return attrs, manifests


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except H5_ERRORS as e:
        raise damaged(path, e) from None


def _open_cache(path: Path) -> h5py.File:
    """Open the cache file at path for reading; a missing one says to run the extract stage."""
    if not path.is_file():
        raise CacheError(f"no feature cache at '{path}': run the extract stage first "
                         "(python run_pipeline.py extract)")
    return _open(path)


def verify_cache(path: str | Path, key: Optional[str] = None) -> tuple[dict, dict[str, SplitManifest]]:
    """The attributes and rows of a complete, intact cache file (features not read); CacheError if not."""
    path = Path(path)
    with _open_cache(path) as f:
        return _verify_open(f, path, key)


def read_attrs(path: str | Path) -> Optional[dict]:
    """The attributes of a complete cache file, or None if the file is missing or incomplete."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            attrs = _attrs(f)
    except H5_ERRORS:
        return None
    return attrs if attrs.get("complete") else None


def read_manifest(path: str | Path) -> dict[str, SplitManifest]:
    try:
        with _open(Path(path)) as f:
            return _read_manifests(f)
    except H5_ERRORS as e:
        raise damaged(path, e) from None


def read_cache(path: str | Path, key: Optional[str] = None) -> FeatureCache:
    """Load a complete cache into memory after verifying structure, rows and key (and `key`, when given)."""
    path = Path(path)
    try:
        with _open_cache(path) as f:
            attrs, manifests = _verify_open(f, path, key)
            splits = {s: CachedSplit(f[s]["features"][()], np.asarray(manifests[s].labels, dtype=np.int64),
                                     list(manifests[s].paths), list(manifests[s].sha256)) for s in SPLITS}
    except H5_ERRORS as e:  # a fletcher32 checksum mismatch surfaces as OSError here
        raise damaged(path, e) from None
    return FeatureCache(path, attrs, tuple(attrs["classes"]), splits)


# ----------------------------------------------------------------------------- streaming
class SplitReader:
    """One split of an open cache file, read a row range at a time; only labels and paths are in memory."""

    def __init__(self, path: Path, name: str, features: h5py.Dataset, manifest: SplitManifest) -> None:
        self.path, self.name, self._features = path, name, features
        self.labels = np.asarray(manifest.labels, dtype=np.int64)   # (n_samples,)
        self.paths = list(manifest.paths)

    @property
    def n_rows(self) -> int:
        return int(self._features.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self._features.shape[1])

    @property
    def chunk_rows(self) -> int:
        """Rows per HDF5 chunk: the unit HDF5 reads and checksums (ROW_CHUNK in files written here)."""
        chunks = self._features.chunks
        return int(chunks[0]) if chunks else max(1, min(self.n_rows, ROW_CHUNK))

    def read_rows(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Read rows [start, stop) into out[:stop - start] and return that view.

        out : float32 C-contiguous ndarray of shape (>= stop - start, feature_dim); HDF5 converts a
        float16 cache on the way. A failed fletcher32 checksum raises CacheError.
        """
        if not 0 <= start <= stop <= self.n_rows:
            raise ValueError(f"rows [{start}, {stop}) outside {self.name}'s {self.n_rows} rows")
        if stop > start:
            try:
                self._features.read_direct(out, np.s_[start:stop], np.s_[0:stop - start])
            except H5_ERRORS as e:  # a fletcher32 checksum mismatch surfaces here
                raise CacheError(f"cannot read rows {start}..{stop - 1} of '{self.name}/features' in cache "
                                 f"'{self.path}': {e}") from None
        return out[:stop - start]


class FeatureReader(_Splits):
    """A verified cache file kept open for streaming its features; use as a context manager.

    Opening checks the file exactly like `read_cache` (structure, rows against the manifest digest,
    key) but reads no feature: `train` and `val` read row ranges on demand.
    """

    def __init__(self, path: str | Path, key: Optional[str] = None) -> None:
        self.path = Path(path)
        self._file = _open_cache(self.path)
        try:
            self.attrs, manifests = _verify_open(self._file, self.path, key)
        except BaseException:
            self._file.close()
            raise
        self.classes = tuple(self.attrs["classes"])
        self.splits = {s: SplitReader(self.path, s, self._file[s]["features"], manifests[s]) for s in SPLITS}

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "FeatureReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_features(path: str | Path, key: Optional[str] = None) -> FeatureReader:
    """Open a complete cache for streaming after verifying structure, rows and key; CacheError if not."""
    return FeatureReader(path, key)


def feature_shapes(path: str | Path) -> dict[str, tuple[int, int]]:
    """(n_samples, feature_dim) of each split's features, from the file's metadata alone (nothing verified)."""
    try:
        with _open(Path(path)) as f:
            shapes = {s: tuple(int(v) for v in f[s]["features"].shape) for s in SPLITS}
    except CacheError:
        raise
    except H5_ERRORS as e:
        raise CacheError(f"cache '{path}' has no train and val features: {e}") from None
    if any(len(shape) != 2 for shape in shapes.values()):
        raise CacheError(f"cache '{path}': features are not 2-D ({shapes})")
    return shapes


def _row_changes(old: dict[str, SplitManifest], new: dict[str, SplitManifest]) -> list[str]:
    parts = []
    for split in SPLITS:
        before, after = old[split].rows(), new[split].rows()
        old_paths = {r[0] for r in before}
        new_paths = {r[0] for r in after}
        added, removed = len(new_paths - old_paths), len(old_paths - new_paths)
        changed = len({r[0] for r in after ^ before} & old_paths & new_paths)
        if added or removed or changed:
            parts.append(f"{split}: {added} added, {removed} removed, {changed} changed or relabelled")
    return parts


def miss_reason(path: Path, key: str, config_key: str, manifests: dict[str, SplitManifest]) -> Optional[str]:
    """None when path holds an intact cache with this key; else why it cannot be used."""
    path = Path(path)
    if not path.exists():
        return "no complete cache file yet"
    attrs = read_attrs(path)
    if attrs is None:
        return "cache file is incomplete or unreadable"
    if attrs.get("format_version") != FORMAT_VERSION:
        return f"cache format {attrs.get('format_version')} != {FORMAT_VERSION}"
    if attrs.get("config_key") != config_key:
        return "backbone, weights or preprocessing changed"
    try:
        stored_attrs, old = verify_cache(path)
    except CacheError as e:
        return f"cache file failed verification ({e})"
    if stored_attrs["key"] == key:
        return None
    parts = _row_changes(old, manifests)
    return "images changed (" + "; ".join(parts) + ")" if parts else "class list or image order changed"


def _describe_config_change(old: dict, new: dict) -> str:
    if old.get("format_version") != new.get("format_version"):  # other keys may differ only by format
        return f"cache format changed ({old.get('format_version')} -> {new.get('format_version')})"
    parts = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if k == "weights":
            parts.append("weights changed")
        elif k == "preprocess" and isinstance(a, dict) and isinstance(b, dict):
            fields = ", ".join(f"{f} {a.get(f)} -> {b.get(f)}" for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f))
            parts.append(f"preprocessing changed ({fields})")
        elif k == "dtype":
            parts.append(f"storage dtype changed ({a} -> {b})")
        else:
            parts.append(f"{k} changed ({a} -> {b})")
    return ", ".join(parts) or "configuration changed"


def explain_new_config(cache_dir: Path, feature_config: dict, data_root: str) -> Optional[str]:
    """Why no cache exists for feature_config, from the newest cache of the same data with another config."""
    newest, newest_mtime = None, -1.0
    for path in Path(cache_dir).glob("*.h5"):
        attrs = read_attrs(path)
        if attrs is None or attrs.get("data_root") != data_root or not isinstance(attrs.get("versions"), dict):
            continue
        mtime = path.stat().st_mtime
        if mtime > newest_mtime:
            newest, newest_mtime = attrs, mtime
    if newest is None or newest["versions"] == feature_config:
        return None
    return _describe_config_change(newest["versions"], feature_config)


# ----------------------------------------------------------------------------- sources of rows
@dataclass(frozen=True)
class RowSource:
    """Where a computed feature row already lives: file, dataset and row index."""

    file: Path
    dataset: str
    row: int


def previous_rows(path: Path, config_key: str) -> tuple[dict[str, RowSource], Optional[int]]:
    """sha256 -> row of an intact complete cache at path with this config key (the previous run's rows)."""
    if not path.is_file():
        return {}, None
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


def is_intact(path: Path) -> bool:
    """True when path is a complete cache whose structure, rows, key and feature checksums all verify."""
    try:
        verify_cache(path)
        check_features(path)
    except CacheError:
        return False
    return True


def check_features(path: Path, datasets: Iterable[str] = tuple(f"{s}/features" for s in SPLITS)) -> None:
    """Read every feature row once so HDF5 verifies the fletcher32 checksums; CacheError on damage."""
    try:
        with _open(path) as f:
            for name in datasets:
                ds = f[name]
                for start in range(0, ds.shape[0], ASSEMBLE_ROWS):
                    ds[start:start + ASSEMBLE_ROWS]
    except CacheError:
        raise
    except H5_ERRORS as e:
        raise CacheError(f"cannot read features of '{path}': {e}") from None


class ChunkStore:
    """Rows computed by an unfinished extraction: self-contained chunk files in `<name>.partial/`.

    Each chunk file holds `sha256` (k,) and `features` (k, feature_dim) and is renamed into place
    only once complete, so the folder never holds a torn chunk under a real name.
    """

    def __init__(self, folder: Path, config_key: str, dtype: str) -> None:
        self.folder = Path(folder)
        self.config_key = config_key
        self.dtype = np.dtype(dtype)

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
        with _open(path) as f:
            attrs = _attrs(f)
            if not attrs.get("complete") or attrs.get("config_key") != self.config_key \
                    or attrs.get("format_version") != FORMAT_VERSION:
                raise CacheError(f"chunk '{path}' is incomplete or for another configuration")
            if "sha256" not in f or "features" not in f:
                raise CacheError(f"chunk '{path}' lacks its datasets")
            sha, feats = f["sha256"], f["features"]
            if sha.ndim != 1 or sha.dtype != np.dtype("S64") or feats.ndim != 2 \
                    or feats.shape[0] != sha.shape[0] or feats.dtype != self.dtype:
                raise CacheError(f"chunk '{path}' has an unexpected structure")
            hashes, dim = [h.decode() for h in sha[()]], int(feats.shape[1])
        check_features(path, ("features",))
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

    def write(self, sha256: list[str], features: np.ndarray) -> Path:
        """Save one chunk: sha256 (k,), features (k, feature_dim) in the storage dtype.

        The HDF5 image is built in memory and written with plain file I/O, so a full disk is an
        ordinary OSError rather than a failure inside the HDF5 library.
        """
        path = self.folder / f"chunk-{digest(sha256)[:16]}.h5"
        image = io.BytesIO()
        with h5py.File(image, "w") as f:
            f.create_dataset("sha256", data=np.asarray(sha256, dtype="S64"))
            f.create_dataset("features", data=features.astype(self.dtype, copy=False),
                             chunks=features.shape, fletcher32=True)
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

    def __init__(self, path: str | Path, feature_dim: int, dtype: str) -> None:
        self.path = Path(path)
        self.feature_dim = feature_dim
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
            g.create_dataset("labels", data=np.asarray(manifest.labels, dtype=np.int64))
            g.create_dataset("paths", data=list(manifest.paths), dtype=h5py.string_dtype("utf-8"))
            g.create_dataset("sha256", data=np.asarray(manifest.sha256, dtype="S64"))
        except (OSError, RuntimeError) as e:
            raise write_error(self.path.parent, e) from None
        self.manifests[split] = manifest

    def write_rows(self, split: str, start: int, features: np.ndarray) -> None:
        """features: (batch, feature_dim) written at rows [start, start + batch)."""
        try:
            self._file[split]["features"][start:start + len(features)] = features.astype(self.dtype, copy=False)
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


def _gather(sources: list[tuple[RowSource, int]], out: np.ndarray) -> None:
    """Copy each (source row, output position) into out, reading each file once, in row order."""
    groups: dict[tuple[Path, str], list[tuple[int, int]]] = defaultdict(list)
    for src, pos in sources:
        groups[(src.file, src.dataset)].append((src.row, pos))
    for (file, dataset), items in groups.items():
        rows = sorted({r for r, _ in items})
        lo, hi = rows[0], rows[-1] + 1
        dense = hi - lo <= 4 * len(rows)  # one slice beats h5py's slow point selection
        try:
            with _open(file) as f:
                block = f[dataset][lo:hi] if dense else f[dataset][rows]
        except OSError as e:
            raise CacheError(f"cannot read features from '{file}': {e}") from None
        index = {r: (r - lo if dense else i) for i, r in enumerate(rows)}
        for r, pos in items:
            out[pos] = block[index[r]]


def assemble_cache(path: Path, manifests: dict[str, SplitManifest], feature_dim: int, dtype: str,
                   rows: dict[str, RowSource], attrs: dict) -> Path:
    """Write the complete cache at path from rows already computed (previous cache, chunk files).

    Rows are copied in the storage dtype, so every feature is bitwise what was computed.
    """
    missing = [h for m in manifests.values() for h in m.sha256 if h not in rows]
    if missing:
        raise CacheError(f"internal error: {len(missing)} rows have no computed features")
    with CacheWriter(path, feature_dim, dtype) as writer:
        for split in SPLITS:
            m = manifests[split]
            writer.create_split(split, m)
            for start in range(0, len(m), ASSEMBLE_ROWS):
                block = m.sha256[start:start + ASSEMBLE_ROWS]
                out = np.empty((len(block), feature_dim), dtype=dtype)
                _gather([(rows[h], i) for i, h in enumerate(block)], out)
                writer.write_rows(split, start, out)
        return writer.commit(attrs)


def discard(path: Path) -> None:
    """Delete a damaged complete cache (call with the cache lock held)."""
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)


def remove_stale_files(path: Path) -> None:
    """Temporary files of dead writers next to path (call with the cache lock held)."""
    remove_stale_temps(path.parent, path.name, any_pid=True)


# ----------------------------------------------------------------------------- scan index
@dataclass(frozen=True)
class ScanEntry:
    """What the pre-scan learnt about one file, valid while its stat signature is unchanged."""

    stat: tuple[int, ...]      # STAT_FIELDS
    sha256: str                # "" when the file could not be read
    reason: str                # "" for a good image, else a bad-file reason code
    detail: str


def scan_index_path(cache_dir: str | Path, data_root: Path) -> Path:
    return Path(cache_dir) / f"scan-{digest(os.path.realpath(data_root))[:16]}.h5"


SCAN_USERBLOCK = 512           # bytes before the HDF5 data of a scan index: a magic and the SHA-256 of the rest
SCAN_MAGIC = b"scan-index sha256 "


def read_scan_index(path: Path) -> dict[str, ScanEntry]:
    """path -> entry of an earlier pre-scan; {} when there is none or it is unusable (it is only a speed-up).

    The whole file is checked against the SHA-256 in its first bytes before HDF5 parses any of it (a
    damaged index can crash the HDF5 library, not only raise): a damaged index (say, one changed
    character of a stored SHA-256) is ignored, with a line saying so, and every image is hashed again.
    """
    if not path.is_file():
        return {}
    try:
        raw = path.read_bytes()
    except OSError:
        return {}
    head, body = raw[:SCAN_USERBLOCK], raw[SCAN_USERBLOCK:]
    recorded = head[len(SCAN_MAGIC):len(SCAN_MAGIC) + 64]
    if not head.startswith(SCAN_MAGIC) or recorded != hashlib.sha256(body).hexdigest().encode():
        print(f"extract: the scan index '{path}' failed its checksum (damaged or older); hashing every image again")
        return {}
    try:
        with h5py.File(io.BytesIO(raw), "r") as f:
            if f.attrs.get("format_version") != FORMAT_VERSION:
                return {}
            n = f["paths"].shape[0]
            if f["stat"].shape != (n, len(STAT_FIELDS)) or f["sha256"].shape != (n,) \
                    or f["reason"].shape != (n,) or f["detail"].shape != (n,):
                return {}
            paths = [p.decode() for p in f["paths"][()]]
            stats, shas = f["stat"][()], f["sha256"][()]
            reasons, details = f["reason"][()], f["detail"][()]
        return {p: ScanEntry(tuple(int(v) for v in stats[i]), shas[i].decode(), reasons[i].decode(),
                             details[i].decode()) for i, p in enumerate(paths)}
    except H5_ERRORS:
        return {}


def write_scan_index(path: Path, entries: dict[str, ScanEntry]) -> None:
    """Replace the scan index atomically; raises OSError (callers treat it as optional).

    Built in memory and written with plain file I/O, like chunks: a full disk cannot leave the HDF5
    library with a half-closed file. The HDF5 user block holds SCAN_MAGIC and the SHA-256 of the rest.
    """
    names = sorted(entries)
    string = h5py.string_dtype("utf-8")
    image = io.BytesIO()
    with h5py.File(image, "w", userblock_size=SCAN_USERBLOCK) as f:
        f.create_dataset("paths", data=names, dtype=string)
        f.create_dataset("stat", data=np.asarray([entries[p].stat for p in names], dtype=np.int64)
                         .reshape(len(names), len(STAT_FIELDS)))
        f.create_dataset("sha256", data=np.asarray([entries[p].sha256 for p in names], dtype="S64"))
        f.create_dataset("reason", data=[entries[p].reason for p in names], dtype=string)
        f.create_dataset("detail", data=[entries[p].detail for p in names], dtype=string)
        f.attrs["format_version"] = FORMAT_VERSION
    data = bytearray(image.getvalue())
    data[:SCAN_USERBLOCK] = (SCAN_MAGIC + hashlib.sha256(data[SCAN_USERBLOCK:]).hexdigest().encode()
                             ).ljust(SCAN_USERBLOCK, b"\0")
    atomic_write_bytes(path, bytes(data))


def remove_stale_scan_temps(path: Path) -> None:
    remove_stale_temps(path.parent, path.name)


def iter_unique(hashes: Iterable[str]) -> list[str]:
    """Hashes in first-seen order, each once."""
    return list(dict.fromkeys(hashes))


# ----------------------------------------------------------------------------- augmented-view bank
def views_path(path: Path, views_key: str) -> Path:
    """The view bank of the cache at path: <cache stem>.views-<views_key[:16]>.h5 beside it."""
    return Path(path).with_name(f"{Path(path).stem}.views-{views_key[:16]}.h5")


def write_views(path: Path, views: np.ndarray, attrs: dict) -> Path:
    """Write /train/views (n_views, n_train, feature_dim) under a temporary name, then rename it."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            k, n, d = views.shape
            f.create_dataset("train/views", data=views, chunks=(1, max(1, min(n, ROW_CHUNK)), d) if n else None,
                             fletcher32=True)
            for name, value in attrs.items():
                f.attrs[name] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value
            f.attrs["complete"] = True
    return path


def read_views(path: Path, views_key: str, cache_key: str, n_train: int, feature_dim: int) -> Optional[np.ndarray]:
    """The bank (n_views, n_train, feature_dim) if path holds one for exactly these keys, else None."""
    if not Path(path).is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            if not f.attrs.get("complete") or f.attrs.get("views_key") != views_key \
                    or f.attrs.get("cache_key") != cache_key:
                return None
            ds = f.get("train/views")
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 3 or ds.shape[1:] != (n_train, feature_dim) \
                    or ds.dtype not in FEATURE_DTYPES:
                return None
            return ds[()]
    except H5_ERRORS:  # unreadable or a checksum failed: rebuild, never reuse
        return None
