"""Which run folder a config uses when `run.name` is not given: one derived from the data.

A run folder belongs to one dataset (rundir.check_same_data), so the default name is the data's
identity: `demo` for the flowers demo, `demo-digits` for the digits demo, else the data folder's
name plus 8 hex digits of the SHA-256 of its real path (`hymenoptera_data-1a2b3c4d`): another
dataset gets its own folder instead of being mixed into the demo's. With `features.file` the data
is the one the file was extracted from (its recorded data root). Stdlib only (the cache file's
attributes are read through pipeline.cache, lazily, in features.file mode alone).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from pipeline.fsutil import data_name

# Where pipeline.data puts the demos' images, so that a path to one (as a cache file records it) names the demo.
_PACKAGE = Path(__file__).resolve().parent
DEMO_RUN_NAMES = {"demo:flowers": ("demo", _PACKAGE / "demo_data" / "flowers"),
                  "demo:digits": ("demo-digits", _PACKAGE.parent / "data" / "digits")}


def canonical_root(root: str) -> str:
    """data.root as one string per dataset: a demo's name (demo:flowers), or the folder's real path."""
    real = os.path.realpath(os.path.expanduser(root)) if not root.startswith("demo:") else root
    for name, (_, folder) in DEMO_RUN_NAMES.items():
        if root == name or real == os.path.realpath(folder):
            return name
    return real


def data_run_name(root: str) -> str:
    """The default run folder name for data.root: demo, demo-digits, or <folder name>-<8 hex of its path>."""
    canonical = canonical_root(root)
    if canonical in DEMO_RUN_NAMES:
        return DEMO_RUN_NAMES[canonical][0]
    if root.startswith("demo:"):  # an unknown demo: data.root's own check names the available ones later
        return "demo-" + "".join(c if c.isalnum() else "-" for c in root[5:])[:40]
    return data_name(canonical)


def file_data_root(features_file: str) -> Optional[str]:
    """The data root a cache file records (None when the file is missing, incomplete or records none)."""
    from pipeline.cache import read_attrs

    attrs = read_attrs(features_file)
    root = attrs.get("data_root") if attrs else None
    return root if isinstance(root, str) and root else None


def resolve_run_name(cfg) -> str:
    """Fill in what the config leaves to the data, before any stage runs; returns the run folder's name.

    features.file set: data.root becomes the file's recorded data root (the file's data is the data,
    so config.json and the one-dataset-per-folder check speak of it). run.name null: derived from
    data.root (data_run_name). An explicit run.name is kept as given.
    """
    if cfg.features.file:
        recorded = file_data_root(cfg.features.file)
        if recorded is not None:
            cfg.data.root = recorded
    if cfg.run.name is None:
        cfg.run.name = data_run_name(cfg.data.root)
    return cfg.run.name
