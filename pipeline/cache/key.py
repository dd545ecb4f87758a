"""The cache key and the names of a cache's files: what identifies a feature row and a cache file.

The config key is the SHA-256 of `feature_config()`; the rows are (path, label, SHA-256 of the
image's bytes) per split; the full key is SHA-256(config key, digest of classes + every row).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline import PipelineError
from pipeline.fsutil import data_name, sha256_file

FORMAT_VERSION = 2
SPLITS = ("train", "val")          # every cache file has these
OPTIONAL_SPLITS = ("test",)        # and may have these (a test/ folder, or data.test_fraction)
ALL_SPLITS = SPLITS + OPTIONAL_SPLITS
# How a cache's rows were split (its "split" attribute); files written before it existed used this rule.
DEFAULT_SPLIT_RULE = {"val": "folder", "val_dir": "val", "test": "none"}
ROW_CHUNK = 256           # HDF5 chunk rows of a complete file's features
FEATURE_DTYPES = ("float32", "float16")  # storage dtypes of cached features


class CacheError(PipelineError):
    pass


def tap_dataset(dataset: str, tap: str) -> str:
    """Where a tap's rows live next to the pool features at dataset: 'train/features' -> 'train/taps/<tap>'.

    The pool tap is `features` itself, so a cache of the default taps has exactly the layout it always had.
    """
    if tap == "pool":
        return dataset
    parent = dataset.rpartition("/")[0]
    return f"{parent}/taps/{tap}" if parent else f"taps/{tap}"


def extra_taps(attrs: dict) -> list[str]:
    """The taps a file or chunk stores besides pool (its 'taps' attribute; none in a default cache)."""
    taps = attrs.get("taps")
    return [t for t in taps if t != "pool"] if isinstance(taps, list) else []


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


def cache_path(cache_dir: str | Path, backbone: str, config_key: str, data_root: str | Path | None = None) -> Path:
    """One file per dataset and feature configuration: `<data name>.<backbone>-<config_key[:16]>.h5`.

    The data name (fsutil.data_name: the data folder's name + 8 hex of its real path) lets several
    datasets' caches coexist, so switching A -> B -> A extracts nothing the third time. The image
    list itself is checked inside the file. Without data_root: the name before datasets had their
    own files, `<backbone>-<config_key[:16]>.h5` (still read: see legacy_cache_path).
    """
    name = f"{backbone.replace('/', '-')}-{config_key[:16]}.h5"  # timm/<model>: no sub-folder
    return Path(cache_dir) / (name if data_root is None else f"{data_name(data_root)}.{name}")


def legacy_cache_path(path: Path) -> Path:
    """The name an older version gave the cache at path (one file per feature configuration, any data).

    Such a file is never written any more; its rows are reused (copied, not recomputed) by the first
    extraction under the new name, and it stays readable as features.file.
    """
    path = Path(path)
    return path.with_name(path.name.split(".", 1)[1]) if path.name.count(".") >= 2 else path


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


def feature_config(spec, dtype: str, autocast: str = "none") -> dict:
    """Everything that changes the features except the image list (which the manifest covers).

    The single definition of the cache key's inputs; nothing that only affects heads or
    finetuning belongs here. spec: a backbones.BackboneSpec.
    """
    import torch

    from pipeline import data  # DECODE_VERSION: read at call time

    return {"format_version": FORMAT_VERSION, "backbone": spec.name, "weights": spec.weights_id,
            "cut": spec.cut,  # pool: the final classifier's pooled input; conv: the flattened conv trunk
            "preprocess": spec.preprocess.to_dict(), "decode": data.DECODE_VERSION, "dtype": dtype,
            "rewrites": ["fold_bn"],  # inference-only rewrites of the extractor (pipeline.fold)
            "autocast": autocast,     # the forward passes' precision (extract.autocast); storage is dtype
            "torch": ".".join(torch.__version__.split(".")[:2]),
            "torchvision": ".".join(torchvision_version().split(".")[:2]),
            # the feature sets stored (pipeline.taps); absent for the default, so pool-only keys are unchanged
            **({"taps": list(spec.taps)} if tuple(getattr(spec, "taps", ("pool",))) != ("pool",) else {})}


def torchvision_version() -> str:
    """torchvision's version, without importing it when nothing has yet (1.5 s a warm head does not need)."""
    import sys

    if "torchvision" in sys.modules:
        return sys.modules["torchvision"].__version__
    from importlib.metadata import version

    return version("torchvision")
