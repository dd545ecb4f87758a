"""A verified cache file kept open, its features read a row range at a time (caches bigger than memory)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from pipeline.cache.key import H5_ERRORS, ROW_CHUNK, CacheError, SplitManifest, tap_dataset
from pipeline.cache.reader import _Splits, _open_cache, _verify_open, tapped_attrs


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
    key) but reads no feature: `train` and `val` read row ranges on demand, of the cached tap `tap` (head.tap; pool by default).
    """

    def __init__(self, path: str | Path, key: Optional[str] = None, tap: str = "pool") -> None:
        self.path = Path(path)
        self._file = _open_cache(self.path)
        try:
            self.attrs, manifests = _verify_open(self._file, self.path, key)
            self.attrs = tapped_attrs(self.attrs, tap, self.path)
        except BaseException:
            self._file.close()
            raise
        self.classes = tuple(self.attrs["classes"])
        dataset = tap_dataset("features", tap)
        self.splits = {s: SplitReader(self.path, s, self._file[s][dataset], manifests[s]) for s in manifests}

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "FeatureReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_features(path: str | Path, key: Optional[str] = None, tap: str = "pool") -> FeatureReader:
    """Open a complete cache for streaming (of tap) after verifying structure, rows and key; CacheError if not."""
    return FeatureReader(path, key, tap)

