"""Stage `leaderboard`: the best heads ever trained on the current cache, from the ledger; `--all`: every cache.

    python run_pipeline.py leaderboard                                   # data.root's cache (or the demo's)
    python run_pipeline.py leaderboard --set features.file=cache/<backbone>-<key>.h5   # that file alone
    python run_pipeline.py leaderboard --all                             # every cache in the ledger

The ledger is `run.output_dir/ledger.jsonl`, appended to by head, logistic and sweep. The current
cache is named by its key: with features.file, read from the file (no image opened); with data.root,
the key the extract stage would use (the images are scanned, nothing is extracted). Trains nothing.
"""
from __future__ import annotations

from pathlib import Path

from pipeline import PipelineError
from pipeline import cache as fc
from pipeline.config import Config
from pipeline.head_outputs import ledger_path
from pipeline.ledger import best_heads, caches, format_best, format_caches, read_ledger


def current_cache(cfg: Config) -> tuple[str, str]:
    """(cache key, cache file) of features.file, or of data.root's features (scanned, not extracted)."""
    if cfg.features.file:
        if not Path(cfg.features.file).is_file():
            raise PipelineError(f"features.file '{cfg.features.file}' is not a file: give the path of a cache "
                                "written by the extract stage, or unset it to use data.root")
        return fc.open_cache(cfg.features.file).key, cfg.features.file
    from pipeline.extract import ExtractJob, plan_cache

    plan = plan_cache(ExtractJob.of(cfg))
    return plan.key, str(plan.path)


def run_leaderboard(cfg: Config, device=None) -> dict:
    """Print the leaderboard of the current cache (leaderboard.all: of every cache); a summary for callers."""
    path = ledger_path(cfg.run.output_dir)
    ledger = read_ledger(path)
    if ledger.skipped:
        print(f"leaderboard: skipped {ledger.skipped} damaged line(s) of {path}")
    if cfg.leaderboard.all:
        print(f"ledger {path}: {len(ledger.entries)} heads\n{format_caches(ledger.entries)}")
        return {"ledger": str(path), "caches": [s.cache_key for s in caches(ledger.entries)]}
    key, cache_file = current_cache(cfg)
    print(f"ledger {path}, cache file {cache_file}")
    print(format_best(ledger.entries, key, cfg.leaderboard.top))
    best = best_heads(ledger.entries, key, cfg.leaderboard.top)
    if not best:
        print("train heads with: python run_pipeline.py head | logistic | sweep (same data and backbone), or list "
              "every cache with --all")
    return {"ledger": str(path), "cache_key": key, "heads": [e.head_type for e in best]}
