"""The augmented-view bank: K seeded random augmentations of every train image, as cached features.

Heads get the tutorial's augmentation (RandomResizedCrop + horizontal flip) at cache speed: each
epoch draws one of the K views per image instead of recomputing the backbone on a fresh crop.

View k of an image is drawn with the seed SHA-256(views_seed, k, image bytes' SHA-256), so a view
depends only on the image and the seed — not on its position, the batch size or the loader workers —
and the bank is reproducible. The bank lives beside the clean cache in its own file, keyed by the
clean cache's key, K, the seed and the augmentation; val is never augmented.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline import PipelineError
from pipeline import cache
from pipeline.cache.h5 import read_arrays, write_arrays
from pipeline.frozen import build_frozen, frozen_features
from pipeline.runtime import progress

if TYPE_CHECKING:  # extract imports this module (lazily); the bank only reads the job's fields
    from pipeline.data import ImageListDataset
    from pipeline.extract import CachePlan, ExtractJob

AUGMENTATION = "RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)) + RandomHorizontalFlip(0.5)"


def view_seed(views_seed: int, k: int, image_sha256: str) -> int:
    return int(hashlib.sha256(f"{views_seed}:{k}:{image_sha256}".encode()).hexdigest()[:16], 16)


class AugmentedViews(Dataset):
    """Item i: the K augmented views of train image i, (K, 3, H, W), each from its own seed."""

    def __init__(self, images: ImageListDataset, sha256: tuple[str, ...], n_views: int, views_seed: int) -> None:
        self.images, self.sha256, self.n_views, self.views_seed = images, sha256, n_views, views_seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        views = []
        for k in range(self.n_views):
            # fork_rng: the seeded draw leaves the caller's (or the worker's) RNG state untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_seed(self.views_seed, k, self.sha256[i]))
                views.append(self.images[i][0])
        return torch.stack(views)


@dataclass
class ViewBank:
    views: np.ndarray   # (n_views, n_train, feature_dim)
    path: str
    built: bool
    seconds: float = 0.0   # what building it took (0 when read from disk)


def views_key(plan: CachePlan, n_views: int, views_seed: int) -> str:
    return bank_key(plan.key, plan.spec.preprocess.to_dict(), n_views, views_seed)


def bank_key(cache_key: str, preprocess: dict, n_views: int, views_seed: int) -> str:
    """The view bank's key: the clean cache's key, K, the seed, the augmentation and the preprocessing."""
    return cache.digest({"cache_key": cache_key, "n_views": n_views, "views_seed": views_seed,
                      "augmentation": AUGMENTATION, "preprocess": preprocess})


@torch.inference_mode()
def extract_views(job: ExtractJob, plan: CachePlan, device: torch.device) -> np.ndarray:
    """Run the frozen backbone over K augmented views of every train image: (K, n_train, feature_dim)."""
    from pipeline.data import ImageListDataset, train_transform

    settings = job.extract
    k = settings.train_views
    extractor = build_frozen(job.backbone, plan.spec, job.seed, device)  # as in extract
    images = ImageListDataset(plan.data.root, plan.data.train, train_transform(plan.spec.preprocess))
    dataset = AugmentedViews(images, plan.manifests["train"].sha256, k, settings.views_seed)
    loader = DataLoader(dataset, batch_size=max(1, settings.batch_size // k), shuffle=False,
                        num_workers=job.data.num_workers, pin_memory=device.type == "cuda")
    out = np.empty((k, len(dataset), extractor.feature_dim), dtype=settings.dtype)
    start = 0
    with progress(total=len(dataset) * k, desc="views", unit="img") as bar:
        flat = (batch.flatten(0, 1) for batch in loader)  # (B, K, 3, H, W) -> (B * K, 3, H, W)
        for feats in frozen_features(extractor, flat, device, settings.autocast):
            b = len(feats) // k
            out[:, start:start + b] = feats.reshape(b, k, -1).transpose(1, 0, 2)  # (B, K, D) -> (K, B, D)
            start += b
            bar.update(b * k)
    return out


def views_path(path: Path, views_key: str) -> Path:
    """The view bank of the cache at path: <cache stem>.views-<views_key[:16]>.h5 beside it."""
    return Path(path).with_name(f"{Path(path).stem}.views-{views_key[:16]}.h5")


def write_views(path: Path, views: np.ndarray, attrs: dict) -> Path:
    """Write /train/views (n_views, n_train, feature_dim) under a temporary name, then rename it."""
    k, n, d = views.shape
    options = {"train/views": {"chunks": (1, max(1, min(n, cache.ROW_CHUNK)), d) if n else None, "fletcher32": True}}
    return write_arrays(path, {"train/views": views}, {**attrs, "complete": True}, options, in_memory=False)


def read_views(path: Path, views_key: str, cache_key: str, n_train: int, feature_dim: int) -> Optional[np.ndarray]:
    """The bank (n_views, n_train, feature_dim) if path holds one for exactly these keys, else None.

    An unreadable file or a failed checksum also gives None: the bank is rebuilt, never reused.
    """
    def accept(attrs: dict, shapes: dict) -> bool:
        shape, dtype = shapes["train/views"]
        return (bool(attrs.get("complete")) and attrs.get("views_key") == views_key
                and attrs.get("cache_key") == cache_key and len(shape) == 3
                and shape[1:] == (n_train, feature_dim) and dtype.name in cache.FEATURE_DTYPES)

    found = read_arrays(path, ("train/views",), accept)
    return None if found is None else found["train/views"]


def ensure_views(job: ExtractJob, plan: CachePlan, feature_dim: int, device: torch.device) -> ViewBank | None:
    """The view bank for job (building it if missing or stale), or None when extract.train_views is 0."""
    k, views_seed = job.extract.train_views, job.extract.views_seed
    if k == 0:
        return None
    key = views_key(plan, k, views_seed)
    path = views_path(plan.path, key)
    views = read_views(path, key, plan.key, len(plan.data.train), feature_dim)
    if views is not None:
        print(f"views: bank hit {path} ({k} views x {views.shape[1]} train images)")
        return ViewBank(views, str(path), built=False)
    print(f"views: extracting {k} augmented views of {len(plan.data.train)} train images")
    t0 = time.perf_counter()
    views = extract_views(job, plan, device)
    write_views(path, views, {"views_key": key, "cache_key": plan.key, "n_views": k,
                              "views_seed": views_seed, "augmentation": AUGMENTATION,
                                 "seeds": "sha256(views_seed:k:image_sha256)[:16] per view"})
    return ViewBank(views, str(path), built=True, seconds=time.perf_counter() - t0)


def views_entry(job: ExtractJob, bank: ViewBank) -> dict:
    """The extract entry's view-bank fields: views, file, whether built now, and the seconds that took."""
    return {"train_views": job.extract.train_views, "views_file": bank.path, "views_built": bank.built,
            "views_seconds": bank.seconds}


def read_bank(features: cache.FeatureSet, n_views: int, views_seed: int) -> ViewBank | None:
    """The view bank beside a cache used on its own (features.file); building one needs the images."""
    if n_views == 0:
        return None
    key = bank_key(features.key, features.backbone["preprocess"], n_views, views_seed)
    path = views_path(features.path, key)
    views = read_views(path, key, features.key, len(features.manifests["train"]), features.feature_dim)
    if views is None:
        raise PipelineError(f"extract.train_views={n_views} needs a view bank beside features.file "
                            f"'{features.path}' (expected {path.name}), and building one needs the images: "
                            "run the extract stage with data.root set, or set extract.train_views=0")
    print(f"views: bank hit {path} ({n_views} views x {views.shape[1]} train images)")
    return ViewBank(views, str(path), built=False)
