"""Which cache a head-type stage trains from, decided before the stage runs.

Two sources, one interface (`StageFeatures`):
- `features.file` set: that cache file alone, verified on its own (`cache.open_cache`); no image is
  opened or stat-ed and the backbone never runs. A damaged file is reported, never deleted.
- otherwise `data.root`'s cache: images are scanned, the cache is extracted first when it is missing
  or stale (`extract.ensure_cache`), and a cache found damaged while reading is deleted and
  extracted again. Only this path imports the extract stage (and with it torchvision).

The stages (head, logistic) take a StageFeatures and never run the backbone themselves.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from pipeline import PipelineError
from pipeline import cache as fc
from pipeline.config import Config


@dataclass
class StageFeatures:
    """The verified cache a stage trains from, and what to do when it turns out damaged."""

    features: fc.FeatureSet
    images: Optional[Path]                  # this run's image tree; None when running from features.file
    seed: int                               # the seed a random-init backbone of these features was built with
    backbone_config: dict                   # backbone.* that rebuild the backbone (params, or the file's)
    data_root: str                          # recorded in model files: where predict finds images later
    extract_entry: Optional[dict] = None    # the extract stage's metrics entry (data.root mode)
    # data.root mode: delete the file if it is damaged (True when deleted), and re-extract it
    discard: Optional[Callable[[], bool]] = field(default=None, repr=False)
    rebuild: Optional[Callable[[], fc.FeatureSet]] = field(default=None, repr=False)
    views: Optional[Callable[[int], Optional[object]]] = field(default=None, repr=False)
    extract_seconds: float = 0.0            # extraction run for this stage (the extract entry's): not its time

    def elapsed(self, t0: float) -> float:
        """The stage's seconds since t0, less the extraction it ran first (which the extract entry records)."""
        return time.perf_counter() - t0 - self.extract_seconds

    @property
    def test(self) -> Optional[fc.CachedSplit]:
        """The optional test split (features, labels, paths), read once; None when the cache has none.

        For scoring the model already chosen on val, once (pipeline.selection.score_test), never for choosing.
        """
        return self.features.test

    @property
    def leaked_images(self) -> int:
        """Images whose content is in more than one split: the extract entry's count, or the file's own."""
        if self.extract_entry is not None and "leaked_images" in self.extract_entry:
            return int(self.extract_entry["leaked_images"])
        from pipeline.splits import count_leaks

        return count_leaks(self.features.manifests)

    def load(self) -> fc.FeatureCache:
        """Every feature in memory; a checksum failure re-extracts once (data.root) or names the file."""
        try:
            return self.features.load()
        except fc.CacheError as e:
            self._extract_again(e)
            return self.features.load()

    def _extract_again(self, e: fc.CacheError) -> None:
        """A cache that failed its check on opening or reading: deleted and extracted again (data.root), or
        named with the fix (features.file, never changed)."""
        if self.rebuild is None:
            raise fc.CacheError(f"{e}; features.file is not changed by this tool: extract it again "
                                "(python run_pipeline.py extract with data.root set)") from None
        print(f"extract: {e}; extracting again")
        self.discard()
        self.features = self.rebuild().with_tap(self.features.tap)

    @contextmanager
    def stream(self) -> Iterator[fc.FeatureReader]:
        """The file open for streaming. A file that fails its check on opening is extracted again (data.root)
        or named (features.file), as in load; a checksum that fails while streaming deletes a damaged data.root
        cache (if it does not verify in full when read again) and says to run the stage again."""
        try:
            reader = self.features.stream()
        except fc.CacheError as e:           # replaced or damaged since it was opened
            self._extract_again(e)
            reader = self.features.stream()
        try:
            yield reader
        except fc.CacheError as e:
            reader.close()
            if self.discard is None:
                raise fc.CacheError(f"{e}; features.file was left as it is: extract it again") from None
            if self.discard():
                raise fc.CacheError(f"{e}; the damaged cache was removed: run the stage again to extract it "
                                    "anew") from None
            raise fc.CacheError(f"{e}; the file verifies in full when read again, so it was kept: run the stage "
                                "again (if it fails again, check the disk)") from None
        finally:
            reader.close()


def from_file(path: str, views_seed: int) -> StageFeatures:
    """features.file: the cache file on its own."""
    from pipeline.splits import warn_leaks

    features = fc.open_cache(path)
    warn_leaks(features.manifests, "features.file: ")  # as extract warns in data.root mode: once per run

    def views(n_views: int):
        from pipeline.views import read_bank

        return read_bank(features, n_views, views_seed)

    return StageFeatures(features, None, features.seed, features.backbone_config, features.data_root, views=views)


def from_images(cfg: Config, device) -> StageFeatures:
    """data.root: scan the images, extract first when the cache is missing or stale."""
    from pipeline.extract import ExtractJob, discard_if_damaged, ensure_cache
    from pipeline.metrics import update_metrics
    from pipeline.views import ensure_views, views_entry

    job = ExtractJob.of(cfg)
    plan, entry = ensure_cache(job, device)
    if not entry["cache_hit"]:
        update_metrics(cfg.run_dir, "extract", entry)
    state = {"plan": plan}

    def rebuild() -> fc.FeatureSet:
        state["plan"], again = ensure_cache(job, device)
        if not again["cache_hit"]:
            update_metrics(cfg.run_dir, "extract", again)
            inputs.extract_entry = again
            inputs.extract_seconds += again["seconds"]
        return fc.open_cache(state["plan"].path, state["plan"].key)

    def views(n_views: int):
        """The view bank; one built now is the extract entry's (views_seconds), not the stage's time."""
        if not n_views:
            return None
        bank = ensure_views(job, state["plan"], inputs.features.feature_dim, device)
        if bank.built:
            inputs.extract_seconds += bank.seconds
            inputs.extract_entry = {**inputs.extract_entry, **views_entry(job, bank)}
            update_metrics(cfg.run_dir, "extract", inputs.extract_entry)
        return bank

    # built before the cache is opened: a file replaced or damaged since ensure_cache looked at it is
    # extracted again (rebuild), which updates this object's extract entry and seconds
    inputs = StageFeatures(None, plan.data.root, cfg.run.seed, cfg.backbone.recorded(), str(plan.data.root), entry,
                           discard=lambda: discard_if_damaged(state["plan"], cfg.extract.lock_timeout),
                           rebuild=rebuild, views=views,
                           extract_seconds=0.0 if entry["cache_hit"] else entry["seconds"])
    try:
        inputs.features = fc.open_cache(plan.path, plan.key)
    except fc.CacheError as e:
        print(f"extract: {e}; extracting again")
        discard_if_damaged(plan, cfg.extract.lock_timeout)
        inputs.features = rebuild()
    return inputs


def stage_features(cfg: Config, device) -> StageFeatures:
    """The cache for a head-type stage: features.file when set, else data.root's (extracted when needed);
    its features are head.tap's (pipeline.taps)."""
    if cfg.head.tap != "pool" and cfg.extract.train_views:
        raise PipelineError(f"extract.train_views augments the pool features only, and head.tap is '{cfg.head.tap}': "
                            "set extract.train_views=0 or head.tap=pool")
    if cfg.features.file:
        if not Path(cfg.features.file).is_file():
            raise PipelineError(f"features.file '{cfg.features.file}' is not a file: give the path of a cache "
                                f"written by the extract stage (under extract.cache_dir, e.g. "
                                f"{cfg.extract.cache_dir}/<data>.<backbone>-<key>.h5), or unset it to use data.root")
        inputs = from_file(cfg.features.file, cfg.extract.views_seed)
    else:
        inputs = from_images(cfg, device)
    inputs.features = inputs.features.with_tap(cfg.head.tap)  # not cached: one line naming head.tap and the cached taps
    return inputs
