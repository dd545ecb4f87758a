"""torchrun on CPU (gloo, 2 processes): sharded extraction, its resume, and DDP finetuning (three launches)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import run_pipeline
from conftest import make_image_folder, tiny_overrides
from pipeline import cache as fc
from pipeline import distributed as dd
from pipeline.data import ImageListDataset, eval_transform, load_image_folder
from pipeline.metrics import read_metrics
from pipeline.predictor import load_predictor

CHILD = Path(__file__).with_name("dist_child.py")


def torchrun(args: list[str], nproc: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    """Launch tests/dist_child.py (run_pipeline.main) under torchrun on this machine's CPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(CHILD), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=300)


def overrides(tmp_path: Path, root: Path, cache: str, run: str, extra: tuple[str, ...] = ()) -> list[str]:
    sets = tiny_overrides(tmp_path, root) + [f"extract.cache_dir={tmp_path / cache}", f"run.name={run}",
                                             "extract.chunk_size=8", "extract.batch_size=4", *extra]
    return [a for s in sets for a in ("--set", s)]


def cache_file(folder: Path) -> Path:
    [path] = [p for p in folder.glob("*.h5") if not p.name.startswith("scan-")]
    return path


def assert_same_cache(a: Path, b: Path, taps: tuple[str, ...] = ("pool",)) -> None:
    """Same key, rows in the same order, features (of every tap in taps) equal within float tolerance.

    Ranks may batch an image with different neighbours than one process does, and oneDNN's
    float32 convolutions then round differently in the last bits (seen: 3e-6 on values ~0.1).
    """
    for tap in taps:
        ca, cb = fc.read_cache(a, tap=tap), fc.read_cache(b, tap=tap)
        assert ca.attrs["key"] == cb.attrs["key"]
        for split in fc.SPLITS:
            assert ca.splits[split].paths == cb.splits[split].paths
            assert ca.splits[split].sha256 == cb.splits[split].sha256
            np.testing.assert_array_equal(ca.splits[split].labels, cb.splits[split].labels)
            np.testing.assert_allclose(ca.splits[split].features, cb.splits[split].features, rtol=1e-4, atol=1e-5)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "imgs", n_train=20, n_val=6)  # 52 images


def test_torchrun_extraction_equals_single_process_stays_incremental_and_finetunes_with_ddp(tmp_path, folder):
    """Sharded extraction, then (one more launch) its incremental re-run with a head trained on rank 0 and
    one epoch of DDP finetuning from it: each torchrun launch costs a few seconds of start-up alone."""
    single = overrides(tmp_path, folder, "cache1", "single")
    assert run_pipeline.main(["extract", *single]) == 0
    args = overrides(tmp_path, folder, "cache2", "dist")
    done = torchrun(["extract", *args])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("extract: cache miss") == 1  # one log: rank 1 prints nothing
    assert "x 2 processes" in done.stdout
    assert_same_cache(cache_file(tmp_path / "cache1"), cache_file(tmp_path / "cache2"))
    entry = read_metrics(tmp_path / "runs" / "dist")["extract"]
    # 52 images in chunks of min(8, ceil(52 / (4 chunks x 2 ranks))) = 7: rank 0 takes chunks 0, 2, 4, 6,
    # rank 1 chunks 1, 3, 5, 7 (the last has 3 rows).
    assert entry["processes"] == 2 and entry["rows_extracted"] == 52 and entry["chunks_written"] == 8
    assert entry["rows_per_process"] == [28, 24]
    assert not fc.partial_dir(cache_file(tmp_path / "cache2")).exists()

    make_image_folder(tmp_path / "more", n_train=22, n_val=6, seed=5)  # new content for the last 2 per class
    for cls in ("ants", "bees"):
        for i in (20, 21):
            (tmp_path / "more" / "train" / cls / f"img_{i:03d}.png").rename(folder / "train" / cls / f"img_{i:03d}.png")
    done = torchrun(["extract", "head", "finetune", *args, "--set", "finetune.init_head=cached"])
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "dist"
    metrics = read_metrics(run_dir)
    entry = metrics["extract"]
    assert entry["rows_extracted"] == 4 and entry["rows_reused"] == 52 and entry["rows_per_process"] == [2, 2]
    assert run_pipeline.main(["extract", *single]) == 0
    assert_same_cache(cache_file(tmp_path / "cache1"), cache_file(tmp_path / "cache2"))
    assert_ddp_finetune(done.stdout, run_dir, metrics, folder)


def assert_ddp_finetune(stdout: str, run_dir: Path, metrics: dict, folder: Path) -> None:
    """A head trained on rank 0 alone, then one epoch of DDP finetuning from it, scored on all of val."""
    assert stdout.count("head: best val_acc") == 1  # rank 0 alone trained the head
    assert stdout.count("finetune: best val_acc") == 1
    assert "DDP, 4 images per process per step" in stdout and "classifier from head.pt" in stdout
    entry = metrics["finetune"]
    assert entry["processes"] == 2 and entry["epochs"] == 1 and metrics["extract"]["processes"] == 2

    # The val accuracy the ranks computed together is the saved model's on all of val, in one process.
    predictor = load_predictor(run_dir, "finetune", torch.device("cpu"))
    data = load_image_folder(str(folder))
    images = ImageListDataset(data.root, data.val, eval_transform(predictor.preprocess))
    x = torch.stack([images[i][0] for i in range(len(images))])
    acc = float((predictor.probs_from_images(x).argmax(1) == np.asarray(data.val.labels)).mean())
    assert acc == pytest.approx(entry["val_acc"], abs=1e-4)
    assert (run_dir / "SHA256SUMS").read_text().count("finetune.pt") == 1


# The killed-rank case also runs a timm model with two taps, so torchrun extraction is covered for timm
# backbones and tapped caches (the case above covers torchvision's).
TIMM_TAPS = ("backbone.name=timm/test_resnet", 'backbone.taps=["pool", "stage-2"]')


def test_a_killed_rank_loses_only_its_chunk_in_progress(tmp_path, folder):
    args = overrides(tmp_path, folder, "cache", "dist", TIMM_TAPS)
    killed = torchrun(["extract", *args], env={"KILL_RANK": "1", "KILL_AFTER_CHUNKS": "1"})
    assert killed.returncode != 0
    cache_dir = tmp_path / "cache"
    assert not [p for p in cache_dir.glob("*.h5") if not p.name.startswith("scan-")]  # nothing published
    [partial] = list(cache_dir.glob("*.partial"))
    saved = sorted(partial.glob("chunk-*.h5"))
    assert saved  # at least the killed rank's own first chunk

    resumed = torchrun(["extract", *args])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    entry = read_metrics(tmp_path / "runs" / "dist")["extract"]
    assert entry["rows_resumed"] == 7 * len(saved) and entry["rows_extracted"] == 52 - 7 * len(saved)
    assert "resuming saved work" in entry["miss_reason"]
    assert run_pipeline.main(["extract", *overrides(tmp_path, folder, "clean", "single", TIMM_TAPS)]) == 0
    assert_same_cache(cache_file(tmp_path / "clean"), cache_file(cache_dir), taps=("pool", "stage-2"))


def test_single_process_helpers_are_identities(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert dd.launch_from_env({}) is None
    assert dd.launch_from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None  # torchrun --nproc_per_node=1
    assert dd.launch_from_env({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}) == dd.Launch(1, 1, 4)
    single = dd.init_distributed(torch.device("cpu"), 1.0)  # no RANK / WORLD_SIZE: a plain run
    assert single == dd.SINGLE
    assert not single.is_distributed and single.rank == 0 and single.world_size == 1 and single.is_main
    assert single.broadcast("x") == "x" and single.all_gather(3) == [3] and single.on_main(lambda: 5) == 5
    single.barrier()
    assert dd.DistContext(1, 4).is_distributed and not dd.DistContext(1, 4).is_main
    items = list(range(11))
    assert dd.SINGLE.shard(items) == items
    parts = [items[r::3] for r in range(3)]
    assert [dd.DistContext(r, 3).shard(items) for r in range(3)] == parts
    assert dd.unshard(parts) == items


def test_the_context_is_frozen_and_the_module_keeps_no_state():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        dd.SINGLE.rank = 1
    assert not [name for name in vars(dd) if name.startswith("_") and not name.startswith("__")]


def test_bad_launch_environment_is_a_clear_error(monkeypatch):
    from pipeline import PipelineError
    with pytest.raises(PipelineError, match="not integers"):
        dd.launch_from_env({"RANK": "a", "WORLD_SIZE": "2"})
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(name, {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}[name])
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(PipelineError, match="MASTER_ADDR"):
        dd.init_distributed(torch.device("cpu"), 1.0)
