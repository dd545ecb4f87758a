import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.extract as ex
from pipeline import cache as fc
from pipeline.metrics import read_metrics

CPU = torch.device("cpu")


def no_forward(*args, **kwargs):
    raise AssertionError("the backbone was built: expected a cache hit")


def test_extract_writes_aligned_features(tiny_cfg):
    cfg = tiny_cfg()
    entry = ex.run_extract(cfg, CPU)
    assert entry["cache_hit"] is False and entry["images"] == 18 and entry["images_per_second"] > 0
    cache = fc.read_cache(entry["cache_file"])
    assert cache.classes == ("ants", "bees")
    assert cache.train.features.shape == (12, 512) and cache.val.features.shape == (6, 512)
    for split in (cache.train, cache.val):
        for path, label in zip(split.paths, split.labels):
            assert path.split("/")[1] == cache.classes[label]
    assert cache.attrs["backbone"]["name"] == "resnet18"
    assert cache.attrs["preprocess"]["crop_size"] == 32
    assert read_metrics(cfg.run_dir)["extract"]["cache_file"] == entry["cache_file"]


def test_rows_equal_a_direct_forward_pass(tiny_cfg):
    """Row i of the cache is the backbone's output for paths[i], nothing shuffled."""
    from pipeline.backbones import build_feature_extractor
    from pipeline.data import eval_transform, load_image

    cfg = tiny_cfg()
    plan, _ = ex.ensure_cache(ex.ExtractJob.of(cfg), CPU)
    cache = fc.read_cache(plan.path)
    torch.manual_seed(cfg.run.seed)
    extractor = build_feature_extractor(cfg.backbone, plan.spec)
    tf = eval_transform(plan.spec.preprocess)
    i = 4
    x = tf(load_image(plan.data.root / cache.val.paths[i]))[None]
    with torch.no_grad():
        assert np.allclose(extractor(x).numpy()[0], cache.val.features[i], atol=1e-5)


def test_second_run_is_a_hit_without_forward_pass(tiny_cfg, monkeypatch):
    cfg = tiny_cfg()
    first = ex.run_extract(cfg, CPU)
    monkeypatch.setattr(ex, "build_feature_extractor", no_forward)
    second = ex.run_extract(cfg, CPU)
    assert second["cache_hit"] is True and second["cache_file"] == first["cache_file"]


def test_head_only_change_is_a_hit(tiny_cfg, monkeypatch):
    ex.run_extract(tiny_cfg(), CPU)
    monkeypatch.setattr(ex, "build_feature_extractor", no_forward)
    for change in ("head.lr=0.5", "head.epochs=9", "finetune.lr=0.3", "logistic.cv_folds=4", "run.name=other"):
        assert ex.run_extract(tiny_cfg(change), CPU)["cache_hit"] is True, change


@pytest.mark.parametrize("change, reason", [
    ("backbone.image_size=40", "preprocessing changed (crop_size 32 -> 40, resize_size 37 -> 46)"),
    ("backbone.name=resnet34", "backbone changed (resnet18 -> resnet34)"),
    ("run.seed=3", "weights changed"),  # random-init weights depend on the seed
    ("extract.dtype=float16", "storage dtype changed (float32 -> float16)")])
def test_feature_changes_are_a_miss_that_says_why(tiny_cfg, change, reason):
    first = ex.run_extract(tiny_cfg(), CPU)
    second = ex.run_extract(tiny_cfg(change), CPU)
    assert second["cache_hit"] is False
    assert second["miss_reason"] == reason
    assert second["cache_file"] != first["cache_file"]


def test_edited_image_is_a_miss_with_reason(tiny_cfg, image_root):
    cfg = tiny_cfg()
    ex.run_extract(cfg, CPU)
    Image.new("RGB", (24, 24), (0, 0, 0)).save(image_root / "train" / "ants" / "img_000.png")
    (image_root / "val" / "bees" / "img_002.png").unlink()
    entry = ex.run_extract(cfg, CPU)
    assert entry["cache_hit"] is False
    assert entry["miss_reason"] == ("images changed (train: 0 added, 0 removed, 1 changed or relabelled; "
                                    "val: 0 added, 1 removed, 0 changed or relabelled)")
    assert len(fc.read_cache(entry["cache_file"]).val.paths) == 5


def test_extraction_is_deterministic(tiny_cfg, tmp_path):
    a = fc.read_cache(ex.run_extract(tiny_cfg(), CPU)["cache_file"])
    b = fc.read_cache(ex.run_extract(tiny_cfg(f"extract.cache_dir={tmp_path / 'other'}"), CPU)["cache_file"])
    assert np.array_equal(a.train.features, b.train.features)


def test_unwritable_cache_dir_is_a_clear_error(tiny_cfg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(fc.CacheError, match="cannot write to cache folder"):
        ex.run_extract(tiny_cfg(f"extract.cache_dir={blocker / 'sub'}"), CPU)


def test_changes_reextract_only_new_content_and_keep_other_rows_bitwise(tiny_cfg, image_root):
    from tests.conftest import assert_aligned

    cfg = tiny_cfg()
    before = fc.read_cache(ex.run_extract(cfg, CPU)["cache_file"])
    old = {sha: feats for split in before.splits.values() for sha, feats in zip(split.sha256, split.features)}
    Image.new("RGB", (24, 24), (9, 9, 9)).save(image_root / "val" / "ants" / "added.png")        # added
    Image.new("RGB", (24, 24), (0, 0, 0)).save(image_root / "train" / "bees" / "img_002.png")    # edited
    (image_root / "train" / "ants" / "img_005.png").unlink()                                      # removed
    (image_root / "val" / "bees" / "img_000.png").rename(image_root / "val" / "bees" / "renamed.png")
    (image_root / "train" / "ants" / "img_001.png").rename(image_root / "train" / "bees" / "was_ant.png")
    entry = ex.run_extract(cfg, CPU)
    assert entry["cache_hit"] is False
    assert (entry["rows_extracted"], entry["rows_reused"], entry["chunks_written"]) == (2, 16, 1)
    after = fc.read_cache(entry["cache_file"])
    assert_aligned(after, image_root)
    assert "train/bees/was_ant.png" in after.train.paths and "val/bees/renamed.png" in after.val.paths
    reused = 0
    for split in after.splits.values():
        for sha, feats in zip(split.sha256, split.features):
            if sha in old:
                assert np.array_equal(feats, old[sha])  # copied, not recomputed: bitwise
                reused += 1
    assert reused == 16


def test_pure_renames_need_no_backbone(tiny_cfg, image_root, monkeypatch):
    cfg = tiny_cfg()
    ex.run_extract(cfg, CPU)
    (image_root / "val" / "bees" / "img_000.png").rename(image_root / "val" / "bees" / "renamed.png")
    monkeypatch.setattr(ex, "build_feature_extractor", no_forward)
    entry = ex.run_extract(cfg, CPU)
    assert entry["cache_hit"] is False and entry["rows_extracted"] == 0 and entry["images_per_second"] is None
    assert "val/bees/renamed.png" in fc.read_cache(entry["cache_file"]).val.paths


def test_lock_held_elsewhere_with_timeout_zero_names_the_holder(tiny_cfg):
    import os

    from pipeline.fsutil import FileLock

    cfg = tiny_cfg("extract.lock_timeout=0")
    plan = ex.plan_cache(ex.ExtractJob.of(cfg))
    plan.path.parent.mkdir(parents=True)
    with FileLock(fc.lock_path(plan.path)):
        with pytest.raises(fc.CacheError, match=f"is locked by pid {os.getpid()}: another extraction"):
            ex.run_extract(cfg, CPU)
    assert ex.run_extract(cfg, CPU)["cache_hit"] is False  # free again


def test_metrics_report_rows_and_bad_files(tiny_cfg):
    cfg = tiny_cfg("extract.chunk_size=5")
    entry = ex.run_extract(cfg, CPU)
    assert (entry["rows_extracted"], entry["rows_reused"], entry["chunks_written"]) == (18, 0, 4)
    assert entry["bad_files"] == 0 and entry["bad_files_report"].endswith("bad_files.json")
    hit = ex.run_extract(cfg, CPU)
    assert (hit["rows_extracted"], hit["rows_reused"]) == (0, 18)


def test_cut_is_part_of_the_cache_key(tiny_cfg):
    alexnet = ("backbone.name=alexnet", "backbone.image_size=64")
    pool = ex.run_extract(tiny_cfg(*alexnet), CPU)
    conv = ex.run_extract(tiny_cfg(*alexnet, "backbone.cut=conv", "extract.dtype=float16"), CPU)
    assert conv["cache_hit"] is False and conv["cache_file"] != pool["cache_file"]
    cache = fc.read_cache(conv["cache_file"])
    assert cache.feature_dim == 9216 and cache.train.features.dtype == np.float16
    assert cache.attrs["versions"]["cut"] == "conv" and cache.attrs["backbone"]["cut"] == "conv"
    assert fc.read_cache(pool["cache_file"]).feature_dim == 4096


def test_missing_weights_fail_before_the_pre_scan_without_a_miss_preamble(tiny_cfg, tmp_path, monkeypatch, capsys):
    import urllib.error

    from pipeline.backbones import BackboneError

    run_extract_first = ex.run_extract(tiny_cfg(), CPU)  # a cache of another backbone: the preamble's material
    assert not run_extract_first["cache_hit"]
    capsys.readouterr()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(ex, "scan_images", lambda *a, **k: pytest.fail("pre-scan ran before the weights check"))
    with pytest.raises(BackboneError, match="could not download the weights of resnet18"):
        ex.run_extract(tiny_cfg("backbone.weights=DEFAULT"), CPU)
    assert "cache miss" not in capsys.readouterr().out
