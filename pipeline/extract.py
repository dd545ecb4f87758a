"""Stage `extract`: run the frozen backbone once over every image and write the HDF5 cache.

Incremental and resumable: rows whose image bytes already have features (in the previous cache
of this configuration, or in chunks an interrupted run saved) are copied bitwise; only the rest
go through the backbone, `extract.chunk_size` images at a time, each chunk saved before the next
starts. See pipeline/cache.py for the file layout and the crash-safety argument.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline import cache as fc
from pipeline import data as imgdata
from pipeline.backbones import BackboneSpec, build_feature_extractor, resolve_backbone
from pipeline.config import Config
from pipeline.data import ImageFolderData, ImageListDataset, Split, eval_transform, load_image_folder
from pipeline.fsutil import FileLock, LockedError
from pipeline.metrics import update_metrics
from pipeline.runtime import GracefulInterrupt, environment_info, progress
from pipeline.scan import ScanResult, check_bad_files, scan_images, write_bad_files_report


class ExtractInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped extraction after saving its work; the message says how to resume."""


@dataclass
class CachePlan:
    """Where the features for this config live and what they must contain."""

    data: ImageFolderData                   # readable images only
    spec: BackboneSpec
    config_key: str
    key: str
    path: Path
    manifests: dict[str, fc.SplitManifest]
    scan: Optional[ScanResult] = field(default=None, repr=False)


@dataclass
class BuildStats:
    rows_extracted: int = 0   # images that went through the backbone in this run
    rows_reused: int = 0      # images whose features were copied (previous cache or saved chunks)
    rows_resumed: int = 0     # of those, from chunks an interrupted run saved
    chunks_written: int = 0
    forward_seconds: float = 0.0


def feature_config(spec: BackboneSpec, dtype: str) -> dict:
    """Everything that changes the features except the image list (which the manifest covers).

    The single definition of the cache key's inputs; nothing that only affects heads or
    finetuning belongs here.
    """
    import torchvision

    return {"format_version": fc.FORMAT_VERSION, "backbone": spec.name, "weights": spec.weights_id,
            "cut": spec.cut,  # pool: the final classifier's pooled input; conv: the flattened conv trunk
            "preprocess": spec.preprocess.to_dict(), "decode": imgdata.DECODE_VERSION, "dtype": dtype,
            "torch": ".".join(torch.__version__.split(".")[:2]),
            "torchvision": ".".join(torchvision.__version__.split(".")[:2])}


def plan_cache(cfg: Config) -> CachePlan:
    """Discover and pre-scan the images, resolve the backbone and the cache key; builds no network."""
    data = load_image_folder(cfg.data.root)
    spec = resolve_backbone(cfg.backbone, cfg.run.seed)
    config_key = fc.digest(feature_config(spec, cfg.extract.dtype))
    index = fc.scan_index_path(cfg.extract.cache_dir, data.root) if cfg.extract.verify == "stat" else None
    scan = scan_images(data, index, cfg.extract.verify, cfg.data.num_workers)
    key = fc.cache_key(config_key, fc.manifest_digest(data.classes, scan.manifests))
    return CachePlan(scan.data, spec, config_key, key, fc.cache_path(cfg.extract.cache_dir, spec.name, config_key),
                     scan.manifests, scan)


# ----------------------------------------------------------------------------- extraction
def _batches(work: list[list[str]], batch_size: int) -> list[list[int]]:
    """Dataset indices per batch; batches never straddle chunks, so a resumed run batches like a clean one."""
    batches, start = [], 0
    for chunk in work:
        batches += [list(range(start + b, start + min(b + batch_size, len(chunk))))
                    for b in range(0, len(chunk), batch_size)]
        start += len(chunk)
    return batches


@torch.inference_mode()
def extract_chunks(cfg: Config, plan: CachePlan, work: list[list[str]], store: fc.ChunkStore,
                   device: torch.device) -> int:
    """Run the backbone over the images of each chunk (lists of sha256) and save each chunk; returns feature_dim.

    A first Ctrl-C finishes the current batch, saves what the chunk has so far and raises
    ExtractInterrupted; a second one stops at once (finished chunks stay saved).
    """
    torch.manual_seed(cfg.run.seed)  # random-init backbones ('none') depend on it
    # channels_last lets oneDNN / cuDNN pick faster convolution kernels (1.7x measured on CPU).
    extractor = build_feature_extractor(cfg.backbone, plan.spec).to(device, memory_format=torch.channels_last)
    first_path = {}
    for split in fc.SPLITS:
        for rel, h in zip(plan.manifests[split].paths, plan.manifests[split].sha256):
            first_path.setdefault(h, rel)
    order = [h for chunk in work for h in chunk]
    dataset = ImageListDataset(plan.data.root, Split(tuple(first_path[h] for h in order), (0,) * len(order)),
                               eval_transform(plan.spec.preprocess), sha256=order)
    batches = _batches(work, cfg.extract.batch_size)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.data.num_workers,
                        pin_memory=device.type == "cuda", worker_init_fn=imgdata.ignore_sigint)
    message = ("extract: Ctrl-C: finishing the current batch and saving progress "
               "(press Ctrl-C again to stop at once)")
    done = 0
    with GracefulInterrupt(message) as interrupt, progress(total=len(order), desc="extract", unit="img") as bar:
        loaded = iter(loader)
        for chunk in work:
            feats = []
            for _ in range(-(-len(chunk) // cfg.extract.batch_size)):
                images, _ = next(loaded)
                images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                feats.append(extractor(images).float().cpu().numpy())  # (B, feature_dim)
                bar.update(len(images))
                if interrupt.requested:
                    n = sum(len(f) for f in feats)
                    store.write(chunk[:n], np.concatenate(feats))
                    done += n
                    raise ExtractInterrupted(
                        f"extract: interrupted; {done} of {len(order)} images extracted in this run are saved in "
                        f"{store.folder}. Run the same command again to resume: only the "
                        f"{len(order) - done} remaining images will go through the backbone")
            store.write(chunk, np.concatenate(feats))
            done += len(chunk)
    return extractor.feature_dim


def _cache_attrs(cfg: Config, plan: CachePlan, device: torch.device) -> dict:
    return {"format_version": fc.FORMAT_VERSION, "config_key": plan.config_key,
            "classes": list(plan.data.classes), "backbone": plan.spec.to_dict(),
            "preprocess": plan.spec.preprocess.to_dict(), "dtype": cfg.extract.dtype,
            "data_root": str(plan.data.root), "versions": feature_config(plan.spec, cfg.extract.dtype),
            "environment": environment_info(device), "seed": cfg.run.seed}


def build_cache(cfg: Config, plan: CachePlan, device: torch.device, reason: str) -> BuildStats:
    """Write the complete cache for plan, reusing every row already computed (call with the lock held)."""
    stats = BuildStats()
    fc.remove_stale_files(plan.path)
    store = fc.ChunkStore(fc.partial_dir(plan.path), plan.config_key, cfg.extract.dtype)
    store.clean()
    previous, feature_dim = fc.previous_rows(plan.path, plan.config_key)
    saved, saved_dim = store.rows()
    feature_dim = feature_dim or saved_dim
    needed = fc.iter_unique(h for s in fc.SPLITS for h in plan.manifests[s].sha256)
    todo = [h for h in needed if h not in previous]
    size = cfg.extract.chunk_size
    work = [[h for h in todo[i:i + size] if h not in saved] for i in range(0, len(todo), size)]
    work = [chunk for chunk in work if chunk]
    stats.rows_extracted = sum(len(c) for c in work)
    stats.rows_reused = len(needed) - stats.rows_extracted
    stats.rows_resumed = sum(1 for h in todo if h in saved)
    resumed = f", {stats.rows_resumed} resumed from an interrupted run" if stats.rows_resumed else ""
    print(f"extract: cache miss ({reason}); {stats.rows_extracted} of {len(needed)} images need the backbone "
          f"({stats.rows_reused} reused{resumed}); {plan.spec.name} at {plan.spec.preprocess.crop_size} px "
          f"on {device}")
    if work:
        t0 = time.perf_counter()
        feature_dim = extract_chunks(cfg, plan, work, store, device)
        stats.forward_seconds = time.perf_counter() - t0
        stats.chunks_written = len(work)
        saved, _ = store.rows()
    fc.assemble_cache(plan.path, plan.manifests, feature_dim, cfg.extract.dtype, {**saved, **previous},
                      _cache_attrs(cfg, plan, device))
    store.remove()
    return stats


def _acquire_lock(plan: CachePlan, timeout: Optional[float]) -> FileLock:
    """The cache's writer lock: one extraction per cache file at a time."""
    def waiting(pid: Optional[int]) -> None:
        print(f"extract: waiting for pid {pid}, which is extracting the same features into {plan.path} "
              f"(extract.lock_timeout={'null' if timeout is None else f'{timeout:g}'})")
    try:
        plan.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(fc.lock_path(plan.path), timeout, on_wait=waiting).acquire()
    except LockedError as e:
        raise fc.CacheError(f"cache '{plan.path}' is locked by pid {e.pid}: another extraction of the same "
                            "features is running. Wait for it to finish, or set extract.lock_timeout "
                            "(null waits until it ends)") from None
    except OSError as e:
        raise fc.write_error(plan.path.parent, e) from None


def _tidy_after_hit(plan: CachePlan) -> None:
    """Remove chunks left by a run that was killed after its cache was complete (if nobody is writing)."""
    partial = fc.partial_dir(plan.path)
    if not partial.is_dir():
        return
    try:
        with FileLock(fc.lock_path(plan.path), timeout=0):
            fc.ChunkStore(partial, plan.config_key, "float32").remove()
    except (LockedError, OSError):
        pass


def _explain_miss(cfg: Config, plan: CachePlan) -> Optional[str]:
    reason = fc.miss_reason(plan.path, plan.key, plan.config_key, plan.manifests)
    if reason == "no complete cache file yet":
        change = fc.explain_new_config(Path(cfg.extract.cache_dir), feature_config(plan.spec, cfg.extract.dtype),
                                       str(plan.data.root))
        if change:
            reason = change
    if reason is not None and fc.partial_dir(plan.path).is_dir():
        reason += "; resuming saved work"
    return reason


def ensure_cache(cfg: Config, device: torch.device) -> tuple[CachePlan, dict]:
    """Make sure the cache for cfg exists (extracting if needed); return the plan and metrics entry."""
    t0 = time.perf_counter()
    plan = plan_cache(cfg)
    report = write_bad_files_report(cfg.run_dir, plan.scan, cfg.data.max_bad_fraction)
    check_bad_files(plan.scan, cfg.data.max_bad_fraction, report)
    if plan.scan.bad:
        print(f"extract: skipped {plan.scan.n_bad} unreadable image file(s) of {plan.scan.n_files}; "
              f"reasons in {report}")
    n_images = sum(len(m) for m in plan.manifests.values())
    entry = {"images": n_images, "bad_files": plan.scan.n_bad, "bad_files_report": str(report),
             "files_hashed": plan.scan.n_hashed}
    n_unique = len({h for m in plan.manifests.values() for h in m.sha256})
    reason = fc.miss_reason(plan.path, plan.key, plan.config_key, plan.manifests)
    if reason is not None:
        lock = _acquire_lock(plan, cfg.extract.lock_timeout)
        try:
            reason = _explain_miss(cfg, plan)  # again: the process we waited for may have built it
            stats = build_cache(cfg, plan, device, reason) if reason is not None else None
        finally:
            lock.release()
    seconds = round(time.perf_counter() - t0, 3)
    if reason is None:
        print(f"extract: cache hit {plan.path} ({n_images} images), no forward pass")
        _tidy_after_hit(plan)
        return plan, {"images": n_images, "seconds": seconds, "images_per_second": None, "cache_hit": True,
                      "cache_file": str(plan.path), **entry, "rows_extracted": 0, "rows_reused": n_unique}
    rate = round(stats.rows_extracted / stats.forward_seconds, 1) if stats.forward_seconds else None
    return plan, {"images": n_images, "seconds": seconds, "images_per_second": rate, "cache_hit": False,
                  "cache_file": str(plan.path), "miss_reason": reason, **entry,
                  "rows_extracted": stats.rows_extracted, "rows_reused": stats.rows_reused,
                  "rows_resumed": stats.rows_resumed, "chunks_written": stats.chunks_written}


def run_extract(cfg: Config, device: torch.device) -> dict:
    from pipeline.views import ensure_views  # views build on this module

    plan, entry = ensure_cache(cfg, device)
    if cfg.extract.train_views:
        bank = ensure_views(cfg, plan, int(fc.read_attrs(plan.path)["feature_dim"]), device)
        entry.update(train_views=cfg.extract.train_views, views_file=bank.path, views_built=bank.built)
    update_metrics(cfg.run_dir, "extract", entry)
    return entry


def discard_if_damaged(cfg: Config, plan: CachePlan) -> bool:
    """Delete the cache at plan.path unless it verifies in full (call after a failed read; takes the lock).

    Returns True when it was deleted.
    """
    lock = _acquire_lock(plan, cfg.extract.lock_timeout)
    try:
        if fc.is_intact(plan.path):
            return False
        fc.discard(plan.path)  # never reuse a damaged file, not even its other rows
        return True
    finally:
        lock.release()


def load_features(cfg: Config, device: torch.device, read: Callable = fc.read_cache,
                  ensured: Optional[tuple[CachePlan, dict]] = None) -> tuple[Any, CachePlan]:
    """The cached features for cfg, extracting first if the cache is missing or stale.

    read(path, key): fc.read_cache (all in memory, the default) or fc.open_features (streamed).
    ensured: what ensure_cache already returned for cfg, so its scan is not repeated.
    """
    plan, entry = ensured or ensure_cache(cfg, device)
    try:
        features = read(plan.path, plan.key)
    except fc.CacheError as e:  # damaged since it was written (a checksum failed), or replaced meanwhile
        print(f"extract: {e}; extracting again")
        discard_if_damaged(cfg, plan)
        plan, entry = ensure_cache(cfg, device)
        features = read(plan.path, plan.key)
    if not entry["cache_hit"]:
        update_metrics(cfg.run_dir, "extract", entry)
    return features, plan


def to_tensors(split: fc.CachedSplit) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.ascontiguousarray(split.features, dtype=np.float32)), torch.from_numpy(split.labels)
