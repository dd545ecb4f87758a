import numpy as np
import pytest
import torch

import pipeline.head as head_mod
import pipeline.views as views_mod
from pipeline import cache as fc
from pipeline.backbones import build_feature_extractor
from pipeline.config import HeadConfig
from pipeline.data import ImageListDataset, train_transform
from pipeline.extract import ExtractJob, plan_cache, run_extract
from pipeline.head import run_head, train_head

CPU = torch.device("cpu")


def bank_of(entry):
    with __import__("h5py").File(entry["views_file"], "r") as f:
        return f["train/views"][()]


def test_bank_stores_k_views_per_train_image_and_leaves_val_alone(tiny_cfg):
    clean = run_extract(tiny_cfg(), CPU)
    entry = run_extract(tiny_cfg("extract.train_views=3"), CPU)
    assert entry["cache_hit"] is True and entry["cache_file"] == clean["cache_file"]  # clean cache untouched
    assert entry["views_built"] is True
    views = bank_of(entry)
    cache = fc.read_cache(entry["cache_file"])
    assert views.shape == (3, len(cache.train.paths), cache.feature_dim)
    assert not np.allclose(views[0], cache.train.features)  # augmented, not the clean crop
    assert not np.allclose(views[0], views[1])              # K different draws
    assert "val" not in str(entry["views_file"]) and cache.val.features.shape[0] == 6


def test_bank_rows_are_the_seeded_views_of_their_images(tiny_cfg):
    cfg = tiny_cfg("extract.train_views=2", "extract.views_seed=7")
    views = bank_of(run_extract(cfg, CPU))
    plan = plan_cache(ExtractJob.of(cfg))
    torch.manual_seed(cfg.run.seed)
    extractor = build_feature_extractor(cfg.backbone, plan.spec)
    images = ImageListDataset(plan.data.root, plan.data.train, train_transform(plan.spec.preprocess))
    i, k = 5, 1
    torch.manual_seed(views_mod.view_seed(7, k, plan.manifests["train"].sha256[i]))
    x = images[i][0][None]
    with torch.no_grad():
        assert np.allclose(extractor(x).numpy()[0], views[k, i], atol=1e-4)


def test_bank_is_reproducible_and_seeded(tiny_cfg, tmp_path):
    a = bank_of(run_extract(tiny_cfg("extract.train_views=2"), CPU))
    b = bank_of(run_extract(tiny_cfg("extract.train_views=2", f"extract.cache_dir={tmp_path / 'c2'}"), CPU))
    c = bank_of(run_extract(tiny_cfg("extract.train_views=2", "extract.views_seed=1"), CPU))
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_bank_hit_runs_no_forward_and_k_is_in_the_key(tiny_cfg, monkeypatch):
    first = run_extract(tiny_cfg("extract.train_views=2"), CPU)
    monkeypatch.setattr(views_mod, "extract_views", lambda *a: pytest.fail("bank was rebuilt"))
    again = run_extract(tiny_cfg("extract.train_views=2", "head.lr=0.3"), CPU)
    assert again["views_built"] is False and again["views_file"] == first["views_file"]
    monkeypatch.undo()
    other = run_extract(tiny_cfg("extract.train_views=3"), CPU)
    assert other["views_file"] != first["views_file"] and other["views_built"] is True


def test_head_draws_one_view_per_image_per_epoch(monkeypatch):
    n, d = 40, 6
    x = torch.randn(n, d)
    y = torch.arange(n) % 2
    views = torch.stack([x + 100, x - 100])  # (2, n, d): which view a row came from is visible
    seen = []
    real = head_mod.TensorBatches

    def spy(data, labels, *args, **kwargs):
        seen.append(data.clone())
        return real(data, labels, *args, **kwargs)
    monkeypatch.setattr(head_mod, "TensorBatches", spy)
    train_head(x, y, x, y, 2, HeadConfig(epochs=3), CPU, seed=0, train_views=views)
    epochs = [s for s in seen if not torch.equal(s, x)]  # not the clean val set: the epochs' draws
    assert len(epochs) == 3
    for ex in epochs:
        from_first = torch.isclose(ex, x + 100).all(1)
        from_second = torch.isclose(ex, x - 100).all(1)
        assert torch.all(from_first ^ from_second)           # every row is exactly one view of its image
        assert 0 < from_first.sum() < n                       # and both views are drawn
    assert not torch.equal(epochs[0], epochs[1])              # a new draw every epoch


def test_identical_views_train_like_clean_features():
    x = torch.randn(30, 5)
    y = torch.arange(30) % 3
    a = train_head(x, y, x, y, 3, HeadConfig(epochs=2), CPU, seed=0)
    b = train_head(x, y, x, y, 3, HeadConfig(epochs=2), CPU, seed=0, train_views=torch.stack([x, x]))
    assert torch.equal(a.state_dict["weight"], b.state_dict["weight"])


def test_run_head_with_views(tiny_cfg):
    entry = run_head(tiny_cfg("extract.train_views=2", "head.epochs=2"), CPU)
    assert entry["train_views"] == 2 and 0.0 <= entry["val_acc"] <= 1.0
