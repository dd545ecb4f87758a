"""Shared fixtures: tiny generated ImageFolders and a config for a small random backbone."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from types import SimpleNamespace
from pathlib import Path

# `make test` runs one pytest worker per core (pytest-xdist), so torch's OpenMP threads of one worker
# should sleep, not spin, while another worker has the core (as the CLI sets it: run_pipeline.main).
# Read when torch loads OpenMP: set before any test module imports torch. A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Weights hashes are remembered across processes (fsutil.hash_memo_path): in a folder of this session's
# own, never in the user's ~/.cache; the CLI tests' child processes inherit it.
os.environ.setdefault("FEATURE_PIPELINE_HASH_MEMO", os.path.join(tempfile.mkdtemp(prefix="hash-memo-"),
                                                                  "weights-sha256.json"))

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_config

# Each class gets its own colour so that even random features separate them.
COLOURS = [(220, 40, 40), (40, 60, 220), (40, 200, 60), (230, 220, 40)]


def make_image_folder(root: Path, classes=("ants", "bees"), n_train: int = 6, n_val: int = 3,
                      size: int = 24, seed: int = 0) -> Path:
    """Write root/{train,val}/<class>/img_<i>.png: noisy images tinted by class."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.array(COLOURS[c % len(COLOURS)], dtype=np.float64)
                img = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"img_{i:03d}.png")
    return root


def tiny_overrides(tmp_path: Path, root: Path) -> list[str]:
    return [f"data.root={root}", "data.num_workers=0", "backbone.name=resnet18", "backbone.weights=none",
            "backbone.image_size=32", f"extract.cache_dir={tmp_path / 'cache'}", "extract.batch_size=8",
            f"run.output_dir={tmp_path / 'runs'}", "run.name=t", "run.device=cpu", "head.epochs=3",
            "head.batch_size=4", "logistic.cv_folds=2", "logistic.c_grid=[0.1, 1.0]", "finetune.epochs=1",
            "finetune.batch_size=4", "report.enabled=false", "benchmark.isolate=false"]


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "imgs")


@pytest.fixture
def tiny_cfg(tmp_path: Path, image_root: Path):
    """A config that runs every stage in seconds: resnet18, random weights, 32 px, CPU."""
    def make(*extra: str):
        return load_config(None, tiny_overrides(tmp_path, image_root) + list(extra))
    return make


@pytest.fixture
def params_file(tmp_path: Path, image_root: Path) -> Path:
    """A params.json for the tiny setup, for CLI tests."""
    cfg = load_config(None, tiny_overrides(tmp_path, image_root))
    path = tmp_path / "params.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return path


def assert_aligned(cache, root: Path) -> None:
    """Every row's label is its folder's class and its sha256 is its own file's bytes; no path twice."""
    import hashlib

    for split_name, split in cache.splits.items():
        assert len(set(split.paths)) == len(split.paths), split_name
        assert len(split.paths) == len(split.labels) == len(split.sha256) == len(split.features)
        for path, label, sha in zip(split.paths, split.labels, split.sha256):
            parts = path.split("/")
            assert parts[0] == split_name and parts[1] == cache.classes[label], path
            assert hashlib.sha256((Path(root) / path).read_bytes()).hexdigest() == sha, path


def assert_features_are_the_images(cache, cfg, plan) -> None:
    """Row i's features are the backbone's output for paths[i] (one batch per split, tolerance for batching)."""
    import torch

    from pipeline.backbones import build_feature_extractor
    from pipeline.data import eval_transform, load_image

    torch.manual_seed(cfg.run.seed)
    extractor = build_feature_extractor(cfg.backbone, plan.spec)
    tf = eval_transform(plan.spec.preprocess)
    for split in cache.splits.values():
        x = torch.stack([tf(load_image(plan.data.root / p)) for p in split.paths])
        with torch.no_grad():
            expected = extractor(x).numpy()
        assert np.allclose(expected, split.features.astype(np.float32), atol=1e-4)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """head, logistic and finetune trained once on a tiny folder with reports on (shared, do not modify)."""
    import torch

    from pipeline.finetune import run_finetune
    from pipeline.head import run_head
    from pipeline.logistic import run_logistic

    tmp = tmp_path_factory.mktemp("trained")
    root = make_image_folder(tmp / "imgs")
    overrides = tiny_overrides(tmp, root) + ["report.enabled=true", "head.epochs=4", "head.lr=0.01",
                                             "report.grid_images=4"]
    cfg = load_config(None, overrides)
    entries = {stage.__name__[4:]: stage(cfg, torch.device("cpu")) for stage in (run_head, run_logistic, run_finetune)}
    return SimpleNamespace(tmp=tmp, root=root, overrides=overrides, cfg=cfg, entries=entries)


def write_feature_cache(path: Path, splits: dict, classes, dtype: str = "float32", config_key: str = "test") -> str:
    """A complete cache file holding the given features; returns its key.

    splits: {"train": (features (n, d), labels (n,)), "val": (...)}; paths and hashes are made up.
    """
    from pipeline import cache as fc

    dim = next(iter(splits.values()))[0].shape[1]
    with fc.CacheWriter(path, dim, dtype) as writer:
        for split, (x, y) in splits.items():
            names = tuple(f"{split}/{classes[c]}/{i}.png" for i, c in enumerate(y))
            writer.create_split(split, fc.SplitManifest(names, tuple(int(c) for c in y),
                                                        tuple(fc.digest([split, i]) for i in range(len(y)))))
            writer.write_rows(split, 0, x)
        writer.commit({"config_key": config_key, "classes": list(classes)})
    return fc.read_attrs(path)["key"]


def flip_feature_byte(path: Path, split: str = "train", chunk: int = 0) -> None:
    """Damage one byte of a stored feature chunk, so that its fletcher32 checksum fails."""
    import h5py

    with h5py.File(path, "r") as f:
        offset = f[f"{split}/features"].id.get_chunk_info(chunk).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + 100)
        byte = fh.read(1)
        fh.seek(offset + 100)
        fh.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture
def read_only():
    """Make a folder read-only for this process: chmod, or chattr +i where we are root."""
    made = []

    def make(folder: Path) -> None:
        folder.chmod(0o555)
        made.append(folder)
        if not os.access(folder, os.W_OK):
            return
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a folder read-only for root here")

    yield make
    for folder in made:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


@pytest.fixture
def real_inits(monkeypatch) -> list:
    """Records every nn.init.kaiming_normal_ call on a real (not meta) tensor (ResNet's conv init) from
    the start of the test: clear it before the build under test."""
    import torch

    calls, init = [], torch.nn.init.kaiming_normal_

    def recording(tensor, *args, **kwargs):
        if not tensor.is_meta:
            calls.append(tuple(tensor.shape))
        return init(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_normal_", recording)
    return calls
