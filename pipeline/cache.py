"""The HDF5 feature cache: the only module that imports h5py.

Layout of one cache file::

    /<split>/features   (n_samples, feature_dim) float32|float16, chunked by rows
    /<split>/labels     (n_samples,) int64, index into the 'classes' attribute
    /<split>/paths      (n_samples,) utf-8, relative to the data root
    /<split>/sha256     (n_samples,) the image file's SHA-256, hex
    attrs: format_version, key, config_key, manifest_digest, classes, backbone, preprocess,
           feature_dim, dtype, versions, created, complete (written last)

A file is written under a temporary name, fsynced, then atomically renamed into place, so a
reader never sees a half-written cache under the real name.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from pipeline import PipelineError

FORMAT_VERSION = 1
SPLITS = ("train", "val")
ROW_CHUNK = 256


class CacheError(PipelineError):
    pass


def digest(obj) -> str:
    """SHA-256 of a JSON-serialisable object in canonical form."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def hash_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


# ----------------------------------------------------------------------------- reading
@dataclass
class CachedSplit:
    features: np.ndarray   # (n_samples, feature_dim)
    labels: np.ndarray     # (n_samples,) int64
    paths: list[str]


@dataclass
class FeatureCache:
    path: Path
    attrs: dict
    classes: tuple[str, ...]
    splits: dict[str, CachedSplit]

    @property
    def train(self) -> CachedSplit:
        return self.splits["train"]

    @property
    def val(self) -> CachedSplit:
        return self.splits["val"]

    @property
    def feature_dim(self) -> int:
        return int(self.attrs["feature_dim"])


def _attrs(f: h5py.File) -> dict:
    out = {}
    for k, v in f.attrs.items():
        out[k] = v.item() if isinstance(v, np.generic) else v
    for k in ("classes", "backbone", "preprocess", "versions"):
        if k in out:
            out[k] = json.loads(out[k])
    return out


def _check_structure(f: h5py.File, path: Path) -> None:
    """Dataset names, dtypes and shapes are what this module writes, before any data is read."""
    dim = f.attrs.get("feature_dim")
    for split in SPLITS:
        if split not in f:
            raise CacheError(f"cache '{path}' has no '{split}' group")
        g = f[split]
        for name in ("features", "labels", "paths", "sha256"):
            if name not in g or not isinstance(g[name], h5py.Dataset):
                raise CacheError(f"cache '{path}' has no dataset '{split}/{name}'")
        n = g["labels"].shape[0]
        feats = g["features"]
        if feats.ndim != 2 or feats.shape != (n, dim) or feats.dtype not in (np.float32, np.float16):
            raise CacheError(f"cache '{path}': '{split}/features' has shape {feats.shape} "
                             f"dtype {feats.dtype}, expected ({n}, {dim}) float")
        if g["labels"].dtype.kind != "i" or g["paths"].shape != (n,) or g["sha256"].shape != (n,):
            raise CacheError(f"cache '{path}': '{split}' datasets do not line up")


def read_attrs(path: str | Path) -> Optional[dict]:
    """The attributes of a complete cache file, or None if the file is missing or incomplete."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            attrs = _attrs(f)
    except (OSError, ValueError):
        return None
    return attrs if attrs.get("complete") else None


def read_manifest(path: str | Path) -> dict[str, SplitManifest]:
    with h5py.File(path, "r") as f:
        return {s: SplitManifest(tuple(p.decode() for p in f[s]["paths"][()]),
                                 tuple(int(v) for v in f[s]["labels"][()]),
                                 tuple(h.decode() for h in f[s]["sha256"][()])) for s in SPLITS}


def miss_reason(path: Path, key: str, config_key: str, manifests: dict[str, SplitManifest]) -> Optional[str]:
    """None when path holds a complete cache with this key; else why it cannot be used."""
    attrs = read_attrs(path)
    if attrs is None:
        return "no complete cache file yet" if not path.exists() else "cache file is incomplete or unreadable"
    if attrs.get("format_version") != FORMAT_VERSION:
        return f"cache format {attrs.get('format_version')} != {FORMAT_VERSION}"
    if attrs.get("config_key") != config_key:
        return "backbone, weights or preprocessing changed"
    if attrs.get("key") == key:
        return None
    old = read_manifest(path)
    parts = []
    for split in SPLITS:
        before, after = old[split].rows(), manifests[split].rows()
        old_paths = {r[0] for r in before}
        new_paths = {r[0] for r in after}
        added, removed = len(new_paths - old_paths), len(old_paths - new_paths)
        changed = len({r[0] for r in after ^ before} & old_paths & new_paths)
        if added or removed or changed:
            parts.append(f"{split}: {added} added, {removed} removed, {changed} changed or relabelled")
    return "images changed (" + "; ".join(parts) + ")" if parts else "class list or image order changed"


def read_cache(path: str | Path, key: Optional[str] = None) -> FeatureCache:
    """Load a complete cache into memory, verifying its structure (and key, when given)."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"no feature cache at '{path}': run the extract stage first "
                         "(python run_pipeline.py extract)")
    try:
        with h5py.File(path, "r") as f:
            attrs = _attrs(f)
            if not attrs.get("complete"):
                raise CacheError(f"cache '{path}' is incomplete; run the extract stage again")
            if key is not None and attrs.get("key") != key:
                raise CacheError(f"cache '{path}' does not match the current data and backbone; "
                                 "run the extract stage again")
            _check_structure(f, path)
            splits = {s: CachedSplit(f[s]["features"][()], f[s]["labels"][()].astype(np.int64),
                                     [p.decode() for p in f[s]["paths"][()]]) for s in SPLITS}
    except OSError as e:
        raise CacheError(f"cannot read cache '{path}': {e}") from None
    return FeatureCache(path, attrs, tuple(attrs["classes"]), splits)


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
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._file: Optional[h5py.File] = None

    def __enter__(self) -> "CacheWriter":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = h5py.File(self.tmp, "w")
        except OSError as e:
            raise CacheError(f"cannot write to cache folder '{self.path.parent}': {e}") from None
        return self

    def create_split(self, split: str, manifest: SplitManifest) -> None:
        n = len(manifest)
        g = self._file.create_group(split)
        g.create_dataset("features", shape=(n, self.feature_dim), dtype=self.dtype,
                         chunks=(max(1, min(n, ROW_CHUNK)), self.feature_dim) if n else None)
        g.create_dataset("labels", data=np.asarray(manifest.labels, dtype=np.int64))
        g.create_dataset("paths", data=list(manifest.paths), dtype=h5py.string_dtype("utf-8"))
        g.create_dataset("sha256", data=np.asarray(manifest.sha256, dtype="S64"))

    def write_rows(self, split: str, start: int, features: np.ndarray) -> None:
        """features: (batch, feature_dim) written at rows [start, start + batch)."""
        self._file[split]["features"][start:start + len(features)] = features.astype(self.dtype, copy=False)

    def commit(self, attrs: dict) -> Path:
        f = self._file
        for k, v in attrs.items():
            f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list, tuple)) else v
        f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        f.attrs["complete"] = True
        f.flush()
        f.close()
        self._file = None
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return self.path

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.tmp.exists():
            self.tmp.unlink()
