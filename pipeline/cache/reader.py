"""Reading a complete cache file: structure, rows and key verified before any feature is used."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import h5py
import numpy as np

from pipeline.cache.h5 import attrs_of, open_h5
from pipeline.cache.key import (OPTIONAL_SPLITS, DEFAULT_SPLIT_RULE, FEATURE_DTYPES, FORMAT_VERSION, H5_ERRORS, SPLITS,
                                CacheError, SplitManifest, cache_key, damaged, extra_taps, manifest_digest, tap_dataset)


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
    def test(self):
        """The test split (scored once, after selection on val), or None when the cache has none."""
        return self.splits.get("test")

    @property
    def feature_dim(self) -> int:
        return int(self.attrs["feature_dim"])


@dataclass
class FeatureCache(_Splits):
    path: Path
    attrs: dict
    classes: tuple[str, ...]
    splits: dict[str, CachedSplit]



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


def present_splits(f: h5py.File) -> tuple[str, ...]:
    """train and val (always), then the optional splits the file has (test)."""
    return SPLITS + tuple(s for s in OPTIONAL_SPLITS if s in f)


def _check_taps(f: h5py.File, path: Path, attrs: dict) -> None:
    """Every extra tap the file lists has (n_samples, D_tap) features in every split."""
    dims = attrs.get("tap_dims") if isinstance(attrs.get("tap_dims"), dict) else {}
    for tap in extra_taps(attrs):
        for split in present_splits(f):
            name, n = tap_dataset(f"{split}/features", tap), f[split]["labels"].shape[0]
            ds = f.get(name)
            if not isinstance(ds, h5py.Dataset) or ds.shape != (n, dims.get(tap)) or ds.dtype.name not in FEATURE_DTYPES:
                raise CacheError(f"cache '{path}': tap '{tap}' has no ({n}, {dims.get(tap)}) dataset '{name}'")


def _check_structure(f: h5py.File, path: Path, feature_dim: int) -> None:
    """Dataset names, dtypes and shapes are what this module writes, before any data is read."""
    for split in present_splits(f):
        if split not in f or not isinstance(f[split], h5py.Group):
            raise CacheError(f"cache '{path}' has no '{split}' group")
        g = f[split]
        for name in ("features", "labels", "paths", "sha256"):
            if name not in g or not isinstance(g[name], h5py.Dataset):
                raise CacheError(f"cache '{path}' has no dataset '{split}/{name}'")
        n = g["labels"].shape[0] if g["labels"].ndim == 1 else -1
        feats = g["features"]
        if feats.shape != (n, feature_dim) or feats.dtype.name not in FEATURE_DTYPES:
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
                             tuple(h.decode() for h in f[s]["sha256"][()])) for s in present_splits(f)}


def _verify_open(f: h5py.File, path: Path, key: Optional[str]) -> tuple[dict, dict[str, SplitManifest]]:
    """Attributes, structure, then the rows against manifest_digest and the key; raise CacheError."""
    try:
        return _verify_open_unchecked(f, path, key)
    except CacheError:
        raise
    except H5_ERRORS as e:
        raise damaged(path, e) from None


def _verify_open_unchecked(f: h5py.File, path: Path, key: Optional[str]) -> tuple[dict, dict[str, SplitManifest]]:
    attrs = attrs_of(f)
    _check_attrs(attrs, path)
    _check_structure(f, path, attrs["feature_dim"])
    _check_taps(f, path, attrs)
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



def _open_cache(path: Path) -> h5py.File:
    """Open the cache file at path for reading; a missing one says to run the extract stage."""
    if not path.is_file():
        raise CacheError(f"no feature cache at '{path}': run the extract stage first "
                         "(python run_pipeline.py extract)")
    return open_h5(path)


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
            attrs = attrs_of(f)
    except H5_ERRORS:
        return None
    return attrs if attrs.get("complete") else None


def same_data_caches(cache_dir: str | Path, data_root: str) -> Iterator[tuple[Path, dict]]:
    """(path, attributes) of every complete cache in cache_dir of the data at data_root, in name order:
    the files another feature configuration of the same images may explain a miss by or lend rows to."""
    for path in sorted(Path(cache_dir).glob("*.h5")):
        attrs = read_attrs(path)
        if attrs is not None and attrs.get("data_root") == data_root and isinstance(attrs.get("versions"), dict):
            yield path, attrs


def read_manifest(path: str | Path) -> dict[str, SplitManifest]:
    try:
        with open_h5(Path(path)) as f:
            return _read_manifests(f)
    except CacheError:
        raise
    except H5_ERRORS as e:
        raise damaged(path, e) from None


def tapped_attrs(attrs: dict, tap: str, path: Path) -> dict:
    """attrs as seen through tap: feature_dim is the tap's; CacheError naming head.tap when it is not cached."""
    if tap == "pool":
        return attrs
    cached = ["pool", *extra_taps(attrs)]
    if tap not in cached:
        raise CacheError(f"head.tap '{tap}' is not in the cache '{path}' (cached taps: {', '.join(cached)}): set "
                         f"head.tap to one of them, or add '{tap}' to backbone.taps and extract again")
    return {**attrs, "feature_dim": int(attrs["tap_dims"][tap]), "tap": tap}


def _read_splits(path: Path, key: Optional[str], names: Optional[tuple[str, ...]],
                 tap: str = "pool") -> tuple[dict, dict]:
    """(attrs, split -> CachedSplit) of the named splits (default: all) and tap, verified in the same open."""
    try:
        with _open_cache(path) as f:
            attrs, manifests = _verify_open(f, path, key)
            attrs = tapped_attrs(attrs, tap, path)
            dataset = tap_dataset("features", tap)
            splits = {s: CachedSplit(f[s][dataset][()], np.asarray(manifests[s].labels, dtype=np.int64),
                                     list(manifests[s].paths), list(manifests[s].sha256))
                      for s in manifests if names is None or s in names}
    except CacheError:
        raise
    except H5_ERRORS as e:  # a fletcher32 checksum mismatch surfaces as OSError here
        raise damaged(path, e) from None
    return attrs, splits


def read_cache(path: str | Path, key: Optional[str] = None, tap: str = "pool") -> FeatureCache:
    """Load a complete cache into memory after verifying structure, rows and key (and `key`, when given).

    tap: which cached feature set the splits' `features` hold (backbone.taps; head.tap picks it)."""
    attrs, splits = _read_splits(Path(path), key, None, tap)
    return FeatureCache(Path(path), attrs, tuple(attrs["classes"]), splits)


def read_split(path: str | Path, split: str, key: Optional[str] = None, tap: str = "pool") -> Optional[CachedSplit]:
    """One split of a verified cache in memory (the others' features not read); None if the file lacks it."""
    return _read_splits(Path(path), key, (split,), tap)[1].get(split)



def feature_shapes(path: str | Path) -> dict[str, tuple[int, int]]:
    """(n_samples, feature_dim) of each split's features, from the file's metadata alone (nothing verified)."""
    try:
        with open_h5(Path(path)) as f:
            shapes = {s: tuple(int(v) for v in f[s]["features"].shape) for s in present_splits(f)}
    except CacheError:
        raise
    except H5_ERRORS as e:
        raise CacheError(f"cache '{path}' has no train and val features: {e}") from None
    if any(len(shape) != 2 for shape in shapes.values()):
        raise CacheError(f"cache '{path}': features are not 2-D ({shapes})")
    return shapes



# ----------------------------------------------------------------------------- a cache file on its own
PREPROCESS_FIELDS = ("resize_size", "crop_size", "mean", "std", "interpolation")


def _check_backbone(attrs: dict, path: Path) -> None:
    """The backbone spec and preprocessing a file must carry to be used without the images or the params."""
    spec = attrs.get("backbone")
    fields = ("name", "weights", "weights_id", "preprocess", "cut")
    if not isinstance(spec, dict) or any(f not in spec for f in fields) \
            or not isinstance(spec["preprocess"], dict) or any(f not in spec["preprocess"] for f in PREPROCESS_FIELDS):
        raise CacheError(f"cache '{path}' does not record its backbone and preprocessing (attribute 'backbone'), "
                         "so it cannot be used on its own: run the extract stage again with data.root set")


@dataclass
class FeatureSet:
    """A verified cache file, usable with no image tree: rows, classes and backbone, features read on demand.

    `load()` reads every feature into memory, `stream()` keeps the file open for row ranges; both
    verify the file again in the same open, so a file replaced in between is never mixed up.
    """

    path: Path
    attrs: dict
    classes: tuple[str, ...]
    manifests: dict[str, SplitManifest]
    _read: dict = field(default_factory=dict, repr=False, compare=False)  # splits read on their own
    tap: str = "pool"      # the cached feature set load(), stream() and feature_dim see (head.tap)

    def with_tap(self, tap: str) -> "FeatureSet":
        """This file seen through another cached tap; CacheError naming head.tap and the cached taps if absent."""
        tapped_attrs(self.attrs, tap, self.path)
        return FeatureSet(self.path, self.attrs, self.classes, self.manifests, tap=tap)

    @property
    def taps(self) -> list[str]:
        """Every tap the file holds, pool first."""
        return ["pool", *extra_taps(self.attrs)]

    @property
    def splits(self) -> tuple[str, ...]:
        """train, val and, when the file has one, test."""
        return tuple(self.manifests)

    @property
    def test(self) -> Optional[CachedSplit]:
        """The test split in memory (read once, verified like load()), or None when the file has none.

        Score it once, for the model chosen on val: it is the unbiased figure only while nothing is tuned on it.
        """
        if "test" not in self.manifests:
            return None
        if "test" not in self._read:
            self._read["test"] = read_split(self.path, "test", self.key, self.tap)
        return self._read["test"]

    @property
    def split_rule(self) -> dict:
        """How the rows were split: {"val": "folder", "val_dir": ..., "test": ...} or the content-hash rule."""
        rule = self.attrs.get("split")
        return rule if isinstance(rule, dict) else dict(DEFAULT_SPLIT_RULE)

    @property
    def key(self) -> str:
        return self.attrs["key"]

    @property
    def feature_dim(self) -> int:
        return int(tapped_attrs(self.attrs, self.tap, self.path)["feature_dim"])

    @property
    def backbone(self) -> dict:
        """The backbone spec the features came from: name, weights, weights_id, preprocess, cut (taps, and the
        tap seen when it is not pool: what a model trained on these features records for predict)."""
        spec = self.attrs["backbone"]
        return spec if self.tap == "pool" else {**spec, "tap": self.tap}

    @property
    def backbone_config(self) -> dict:
        """backbone.* params that rebuild this backbone (derived from the spec for files that lack them)."""
        recorded = self.attrs.get("backbone_config")
        if isinstance(recorded, dict):
            return recorded
        spec = self.backbone
        return {"name": spec["name"], "weights": spec["weights"], "image_size": spec["preprocess"]["crop_size"],
                "cut": spec["cut"]}

    @property
    def seed(self) -> int:
        """The seed the extraction ran with (a random-init backbone depends on it)."""
        return int(self.attrs.get("seed", 0))

    @property
    def data_root(self) -> str:
        """The image folder the rows' paths are relative to, as recorded at extraction."""
        return str(self.attrs.get("data_root", ""))

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(n_samples, feature_dim) per split, from the verified rows (nothing read)."""
        return {s: (len(m), self.feature_dim) for s, m in self.manifests.items()}

    def load(self) -> FeatureCache:
        return read_cache(self.path, self.key, self.tap)

    def stream(self):
        """A FeatureReader over this file's tap (context manager)."""
        from pipeline.cache.stream import open_features

        return open_features(self.path, self.key, self.tap)


def open_cache(path: str | Path, key: Optional[str] = None) -> FeatureSet:
    """The cache file at path, verified on its own: structure, rows, stored key, backbone spec (and `key`).

    Reads no feature and needs no image tree; CacheError naming the file and the fix if any check fails.
    """
    path = Path(path)
    attrs, manifests = verify_cache(path, key)
    _check_backbone(attrs, path)
    return FeatureSet(path, attrs, tuple(attrs["classes"]), manifests)
