"""Stage `extract`: run the frozen backbone once over every image and write the HDF5 cache.

Incremental and resumable: rows whose image bytes already have features (in the previous cache
of this configuration, or in chunks an interrupted run saved) are copied bitwise; only the rest
go through the backbone, `extract.chunk_size` images at a time, each chunk saved before the next
starts. See pipeline/cache/__init__.py for the file layout and the crash-safety argument.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader

from pipeline import cache
from pipeline.backbones import BackboneSpec, build_feature_extractor, ensure_weights, resolve_backbone
from pipeline.cache import feature_config
from pipeline.config import BackboneConfig, Config, DataConfig, ExtractConfig
from pipeline.data import (ImageFolderData, ImageListDataset, Split, eval_transform, ignore_sigint,
                           load_image_folder, resolve_data_root)
from pipeline.distributed import SINGLE, DistContext, host
from pipeline.frozen import bfloat16_hint, frozen_features
from pipeline.fsutil import FileLock, LockedError
from pipeline.metrics import update_metrics
from pipeline.runtime import GracefulInterrupt, environment_info, progress
from pipeline.scan import ScanResult, check_bad_files, report_leaks, scan_images, split_scan, write_bad_files_report
from pipeline.scan_index import scan_index_path
from pipeline.taps import batch_rows, join_batches, tapped


class ExtractInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped extraction after saving its work; the message says how to resume."""


@dataclass(frozen=True)
class ExtractJob:
    """What stage extract reads of the config: its own section, the images', the backbone's and the seed."""

    data: DataConfig
    backbone: BackboneConfig
    extract: ExtractConfig
    seed: int                               # a random-init backbone is drawn from it
    run_dir: Path                           # bad_files.json and the extract metrics entry

    @classmethod
    def of(cls, cfg: Config) -> "ExtractJob":
        return cls(cfg.data, cfg.backbone, cfg.extract, cfg.run.seed, cfg.run_dir)


@dataclass
class CachePlan:
    """Where the features for this config live and what they must contain."""

    data: ImageFolderData                   # readable images only
    spec: BackboneSpec
    config_key: str
    key: str
    path: Path
    manifests: dict[str, cache.SplitManifest]
    scan: Optional[ScanResult] = field(default=None, repr=False)
    features: dict = field(default_factory=dict, repr=False)  # feature_config(): what config_key digests


@dataclass
class BuildStats:
    rows_extracted: int = 0   # images that went through the backbone in this run
    rows_reused: int = 0      # images whose features were copied (previous cache or saved chunks)
    rows_resumed: int = 0     # of those, from chunks an interrupted run saved
    chunks_written: int = 0
    forward_seconds: float = 0.0  # under torchrun: the slowest rank's
    assemble_seconds: float = 0.0
    rows_per_process: list[int] = field(default_factory=list)  # images each rank put through the backbone


def cache_file_of(settings: ExtractConfig, spec: BackboneSpec, data_root) -> tuple[dict, str, Path]:
    """(feature configuration, its key, the cache file) of spec's features of the data at data_root."""
    features = feature_config(spec, settings.dtype, settings.autocast)
    config_key = cache.digest(features)
    return features, config_key, cache.cache_path(settings.cache_dir, spec.name, config_key, data_root)


def has_cache_file(settings: ExtractConfig, spec: BackboneSpec, data_root: str) -> bool:
    """Whether a cache file for these features of data_root exists (then extraction may need no weights)."""
    return cache_file_of(settings, spec, resolve_data_root(str(data_root)))[2].is_file()


def plan_cache(job: ExtractJob, dist: DistContext = SINGLE) -> CachePlan:
    """Discover and pre-scan the images, resolve the backbone and the cache key; builds no network."""
    settings = job.extract
    data = load_image_folder(job.data.root, job.data.val_dir, split_train=job.data.val_fraction is not None)
    spec = resolve_backbone(job.backbone, job.seed)
    features, config_key, path = cache_file_of(settings, spec, data.root)
    if not path.is_file():
        ensure_weights(job.backbone)  # missing weights fail now, not after the pre-scan
    index = scan_index_path(settings.cache_dir, data.root) if settings.verify == "stat" else None
    scan = scan_images(data, index, settings.verify, job.data.num_workers, dist)
    scan = split_scan(scan, job.data.val_fraction, job.data.test_fraction, job.data.split_seed)
    key = cache.cache_key(config_key, cache.manifest_digest(data.classes, scan.manifests))
    return CachePlan(scan.data, spec, config_key, key, path, scan.manifests, scan, features)


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
def extract_chunks(job: ExtractJob, plan: CachePlan, work: list[list[str]], store: cache.ChunkStore,
                   device: torch.device, dist: DistContext = SINGLE) -> int:
    """Run the backbone over the images of each chunk (lists of sha256) and save each chunk; returns feature_dim.

    A first Ctrl-C finishes the current batch, saves what the chunk has so far and raises
    ExtractInterrupted; a second one stops at once (finished chunks stay saved).
    """
    # channels_last lets oneDNN / cuDNN pick faster convolution kernels (1.7x measured on CPU).
    extractor = build_feature_extractor(job.backbone, plan.spec, seed=job.seed).to(
        device, memory_format=torch.channels_last)
    extractor = tapped(extractor, plan.spec.taps, plan.spec.preprocess.crop_size, plan.spec.name)
    first_path = {}
    for split in plan.manifests:
        for rel, h in zip(plan.manifests[split].paths, plan.manifests[split].sha256):
            first_path.setdefault(h, rel)
    order = [h for chunk in work for h in chunk]
    dataset = ImageListDataset(plan.data.root, Split(tuple(first_path[h] for h in order), (0,) * len(order)),
                               eval_transform(plan.spec.preprocess), sha256=order)
    batch_size = job.extract.batch_size
    loader = DataLoader(dataset, batch_sampler=_batches(work, batch_size), num_workers=job.data.num_workers,
                        pin_memory=device.type == "cuda", worker_init_fn=ignore_sigint)
    message = ("extract: Ctrl-C: finishing the current batch and saving progress "
               "(press Ctrl-C again to stop at once)")
    done = 0
    with GracefulInterrupt(message) as interrupt, progress(total=len(order), desc="extract", unit="img") as bar:
        computed = frozen_features(extractor, (images for images, _ in loader), device, job.extract.autocast)
        for chunk in work:
            feats = []
            for _ in range(-(-len(chunk) // batch_size)):
                feats.append(next(computed))  # (B, feature_dim), or {tap: (B, D_tap)}
                bar.update(batch_rows(feats[-1]))
                if interrupt.requested:
                    n = sum(batch_rows(f) for f in feats)
                    store.write(chunk[:n], join_batches(feats))
                    done += n
                    who = f"rank {dist.rank} " if dist.is_distributed else ""
                    raise ExtractInterrupted(
                        f"extract: {who}interrupted; {done} of {len(order)} images extracted in this run are saved in "
                        f"{store.folder}. Run the same command again to resume: only the "
                        f"{len(order) - done} remaining images will go through the backbone")
            store.write(chunk, join_batches(feats))
            done += len(chunk)
    return extractor.feature_dim


def _cache_attrs(job: ExtractJob, plan: CachePlan, device: torch.device) -> dict:
    dtype = job.extract.dtype
    return {"format_version": cache.FORMAT_VERSION, "config_key": plan.config_key,
            "classes": list(plan.data.classes), "backbone": plan.spec.to_dict(),
            "backbone_config": job.backbone.recorded(),
            "preprocess": plan.spec.preprocess.to_dict(), "dtype": dtype, "data_root": str(plan.data.root),
            "versions": plan.features,
            "environment": environment_info(device), "seed": job.seed, "split": plan.scan.split_rule}


@dataclass
class BuildWork:
    """What rank 0 (or the only process) found still to compute, with the lock held."""

    chunks: list[list[str]]                 # sha256 per chunk, in cache order
    stats: BuildStats
    previous: dict = field(repr=False)      # sha256 -> row of the previous complete cache
    feature_dim: Optional[int]              # known when any row was already computed


def plan_work(chunk_size: int, plan: CachePlan, store: cache.ChunkStore, device: torch.device, reason: str,
              dist: DistContext = SINGLE) -> BuildWork:
    """Clean up after dead writers and list the chunks to compute (call with the lock held)."""
    stats = BuildStats()
    cache.remove_stale_files(plan.path)
    store.clean()
    previous, feature_dim = cache.previous_rows(plan.path, plan.config_key)
    if not previous:  # backbone.taps narrowed: a cache of more taps holds every row
        previous, feature_dim = cache.rows_of_more_taps(plan.path, plan.features, str(plan.data.root))
    saved, saved_dim = store.rows()
    needed = cache.iter_unique(h for s in plan.manifests for h in plan.manifests[s].sha256)
    todo = [h for h in needed if h not in previous]
    size = chunk_size
    if dist.is_distributed:  # at least 4 chunks per rank, so ranks finish within a small chunk of each other
        size = min(size, max(1, -(-len(todo) // (4 * dist.world_size))))
    work = [[h for h in todo[i:i + size] if h not in saved] for i in range(0, len(todo), size)]
    work = [chunk for chunk in work if chunk]
    stats.rows_extracted = sum(len(c) for c in work)
    stats.rows_reused = len(needed) - stats.rows_extracted
    stats.rows_resumed = sum(1 for h in todo if h in saved)
    stats.chunks_written = len(work)
    resumed = f", {stats.rows_resumed} resumed from an interrupted run" if stats.rows_resumed else ""
    ranks = f" x {dist.world_size} processes" if dist.is_distributed else ""
    print(f"extract: cache miss ({reason}); {stats.rows_extracted} of {len(needed)} images need the backbone "
          f"({stats.rows_reused} reused{resumed}); {plan.spec.name} at {plan.spec.preprocess.crop_size} px "
          f"on {device}{ranks}" + bfloat16_hint(device, plan.features.get("autocast", "none"), stats.rows_extracted))
    return BuildWork(work, stats, previous, feature_dim or saved_dim)


def _check_shared_folder(folder: Path, dist: DistContext) -> None:
    """Every rank must see the chunk files the others write: on several nodes, a shared filesystem."""
    token = None
    if dist.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        token = folder / f".ranks-{os.getpid()}-{time.time_ns()}"
        token.touch()
    token = dist.broadcast(token)
    seen = dist.all_gather((token.exists(), host()))
    if dist.is_main:
        token.unlink(missing_ok=True)
    blind = [(r, h) for r, (ok, h) in enumerate(seen) if not ok]
    if blind:
        raise cache.CacheError(f"extract.cache_dir '{folder.parent}' is not shared by every process: "
                            f"{', '.join(f'rank {r} on {h}' for r, h in blind)} cannot see the files rank 0 "
                            "writes there. Put extract.cache_dir on a filesystem every node mounts "
                            "(NFS, Lustre, ...)")


def build_cache(job: ExtractJob, plan: CachePlan, device: torch.device, reason: str,
                dist: DistContext = SINGLE) -> BuildStats:
    """Write the complete cache for plan, reusing every row already computed (rank 0 holds the lock).

    Under torchrun every rank extracts its share of the chunks (every world_size-th) into the
    shared `<name>.partial/` folder; rank 0 then assembles the complete file from all of them,
    in manifest order, exactly as a single process would from its own chunks.
    """
    dtype = job.extract.dtype
    store = cache.ChunkStore(cache.partial_dir(plan.path), plan.config_key, dtype, plan.spec.taps)
    work = plan_work(job.extract.chunk_size, plan, store, device, reason, dist) if dist.is_main else None
    chunks, stats = dist.broadcast((work.chunks, work.stats) if work else None)
    if dist.is_distributed and chunks:
        _check_shared_folder(store.folder, dist)
    mine = dist.shard(chunks)
    t0 = time.perf_counter()
    dim = extract_chunks(job, plan, mine, store, device, dist) if mine else None
    done = dist.all_gather((dim, time.perf_counter() - t0 if mine else 0.0, sum(len(c) for c in mine)))
    if dist.is_main:
        stats.forward_seconds = max(seconds for _, seconds, _ in done)
        stats.rows_per_process = [n for _, _, n in done]
        feature_dim = work.feature_dim or next(d for d, _, _ in done if d)
        saved, _ = store.rows()
        t1 = time.perf_counter()
        cache.assemble_cache(plan.path, plan.manifests, feature_dim, dtype, {**saved, **work.previous},
                             _cache_attrs(job, plan, device), plan.spec.taps)
        stats.assemble_seconds = time.perf_counter() - t1
        store.remove()
    return dist.broadcast(stats)


def _acquire_lock(plan: CachePlan, timeout: Optional[float]) -> FileLock:
    """The cache's writer lock: one extraction per cache file at a time."""
    def waiting(pid: Optional[int]) -> None:
        print(f"extract: waiting for pid {pid}, which is extracting the same features into {plan.path} "
              f"(extract.lock_timeout={'null' if timeout is None else f'{timeout:g}'})")
    try:
        plan.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(cache.lock_path(plan.path), timeout, on_wait=waiting).acquire()
    except LockedError as e:
        raise cache.CacheError(f"cache '{plan.path}' is locked by pid {e.pid}: another extraction of the same "
                            "features is running. Wait for it to finish, or set extract.lock_timeout "
                            "(null waits until it ends)") from None
    except OSError as e:
        raise cache.write_error(plan.path.parent, e) from None


def _tidy_after_hit(plan: CachePlan) -> None:
    """Remove chunks left by a run that was killed after its cache was complete (if nobody is writing)."""
    partial = cache.partial_dir(plan.path)
    if not partial.is_dir():
        return
    try:
        with FileLock(cache.lock_path(plan.path), timeout=0):
            cache.ChunkStore(partial, plan.config_key, "float32").remove()
    except (LockedError, OSError):
        pass


def _explain_miss(cache_dir: str, plan: CachePlan) -> Optional[str]:
    reason = cache.miss_reason(plan.path, plan.key, plan.config_key, plan.manifests, plan.scan.split_rule)
    if reason == "no complete cache file yet":
        change = cache.explain_new_config(Path(cache_dir), plan.features, str(plan.data.root))
        if change:
            reason = change
    if reason is not None and cache.partial_dir(plan.path).is_dir():
        reason += "; resuming saved work"
    return reason


def ensure_cache(job: ExtractJob, device: torch.device, dist: DistContext = SINGLE) -> tuple[CachePlan, dict]:
    """Make sure the cache for job exists (extracting if needed); return the plan and metrics entry.

    Under torchrun every rank calls this: the pre-scan and the extraction are split between the
    ranks, rank 0 decides, locks, assembles and writes the run-folder files.
    """
    t0 = time.perf_counter()
    plan = plan_cache(job, dist)
    max_bad = job.data.max_bad_fraction
    report = dist.on_main(lambda: write_bad_files_report(job.run_dir, plan.scan, max_bad))
    check_bad_files(plan.scan, max_bad, report)
    if plan.scan.bad:
        print(f"extract: skipped {plan.scan.n_bad} unreadable image file(s) of {plan.scan.n_files}; "
              f"reasons in {report}")
    n_images = sum(len(m) for m in plan.manifests.values())
    entry = {"images": n_images, "bad_files": plan.scan.n_bad, "bad_files_report": str(report),
             "files_hashed": plan.scan.n_hashed, "leaked_images": report_leaks(plan.manifests, not dist.is_main)}
    n_unique = len({h for m in plan.manifests.values() for h in m.sha256})
    reason = dist.on_main(lambda: cache.miss_reason(plan.path, plan.key, plan.config_key, plan.manifests,
                                                    plan.scan.split_rule))
    if reason is not None:
        lock = _acquire_lock(plan, job.extract.lock_timeout) if dist.is_main else None
        try:
            # Again: the process we waited for may have built it.
            reason = dist.on_main(lambda: _explain_miss(job.extract.cache_dir, plan))
            stats = build_cache(job, plan, device, reason, dist) if reason is not None else None
        finally:
            if lock is not None:
                lock.release()
    seconds = time.perf_counter() - t0
    ranks = {"processes": dist.world_size}
    if reason is None:
        print(f"extract: cache hit {plan.path} ({n_images} images), no forward pass")
        if dist.is_main:
            _tidy_after_hit(plan)
        return plan, {"images": n_images, "seconds": seconds, "images_per_second": None, "cache_hit": True,
                      "cache_file": str(plan.path), **entry, "rows_extracted": 0, "rows_reused": n_unique, **ranks}
    rate = stats.rows_extracted / stats.forward_seconds if stats.forward_seconds else None
    return plan, {"images": n_images, "seconds": seconds, "images_per_second": rate, "cache_hit": False,
                  "cache_file": str(plan.path), "miss_reason": reason, **entry,
                  "rows_extracted": stats.rows_extracted, "rows_reused": stats.rows_reused,
                  "rows_resumed": stats.rows_resumed, "chunks_written": stats.chunks_written,
                  "assemble_seconds": stats.assemble_seconds,
                  "rows_per_process": stats.rows_per_process, **ranks}


def extract_stage(job: ExtractJob, device: torch.device, dist: DistContext = SINGLE) -> dict:
    """The extract stage's core: the cache, then the view bank; rank 0 writes the metrics entry."""
    from pipeline.views import ensure_views, views_entry  # views build on this module

    plan, entry = ensure_cache(job, device, dist)
    if job.extract.train_views:
        def build_views() -> dict:  # rank 0 only: the bank is a few passes over the train images
            bank = ensure_views(job, plan, int(cache.read_attrs(plan.path)["feature_dim"]), device)
            return views_entry(job, bank)
        entry.update(dist.on_main(build_views))
    if dist.is_main:
        update_metrics(job.run_dir, "extract", entry)
    return entry


def run_extract(cfg: Config, device: torch.device, dist: DistContext = SINGLE) -> dict:
    """Stage `extract`; under torchrun every rank runs it (dist from `distributed.init_distributed`)."""
    return extract_stage(ExtractJob.of(cfg), device, dist)


def discard_if_damaged(plan: CachePlan, lock_timeout: Optional[float]) -> bool:
    """Delete the cache at plan.path unless it verifies in full (call after a failed read; takes the lock).

    lock_timeout: extract.lock_timeout. Returns True when it was deleted.
    """
    lock = _acquire_lock(plan, lock_timeout)
    try:
        if cache.is_intact(plan.path):
            return False
        cache.discard(plan.path)  # never reuse a damaged file, not even its other rows
        return True
    finally:
        lock.release()


def load_features(job: ExtractJob, device: torch.device, read: Callable = cache.read_cache,
                  ensured: Optional[tuple[CachePlan, dict]] = None) -> tuple[Any, CachePlan]:
    """The cached features for job, extracting first if the cache is missing or stale.

    read(path, key): cache.read_cache (all in memory, the default) or cache.open_features (streamed).
    ensured: what ensure_cache already returned for job, so its scan is not repeated.
    """
    plan, entry = ensured or ensure_cache(job, device)
    try:
        features = read(plan.path, plan.key)
    except cache.CacheError as e:  # damaged since it was written (a checksum failed), or replaced meanwhile
        print(f"extract: {e}; extracting again")
        discard_if_damaged(plan, job.extract.lock_timeout)
        plan, entry = ensure_cache(job, device)
        features = read(plan.path, plan.key)
    if not entry["cache_hit"]:
        update_metrics(job.run_dir, "extract", entry)
    return features, plan
