"""The cache key: every input that changes features invalidates it; head-only settings do not."""
import dataclasses
import os

import pytest
import torch
import torchvision
from PIL import Image

import pipeline.extract as ex
from pipeline import cache as fc
from pipeline.cache import key as cache_key
from pipeline import data as imgdata
from pipeline.backbones import resolve_backbone

KEY_INPUTS = {"format_version", "backbone", "weights", "cut", "preprocess", "decode", "dtype", "torch",
              "torchvision", "rewrites", "autocast"}


@pytest.fixture
def weights_file(tmp_path):
    """A local weights file: its bytes (SHA-256) identify the weights, so the key needs no network."""
    path = tmp_path / "resnet18.pth"
    path.write_bytes(b"weights, version 1")
    return path


def keys(cfg) -> tuple[str, str]:
    plan = ex.plan_cache(ex.ExtractJob.of(cfg))
    return plan.config_key, plan.key


def test_key_inputs_are_exactly_the_feature_settings(tiny_cfg):
    cfg = tiny_cfg()
    spec = resolve_backbone(cfg.backbone, cfg.run.seed)
    assert set(ex.feature_config(spec, "float32")) == KEY_INPUTS
    assert set(ex.feature_config(spec, "float32")["preprocess"]) == {"resize_size", "crop_size", "mean", "std",
                                                                     "interpolation"}


@pytest.mark.parametrize("change", [
    "backbone.name=resnet34", "backbone.image_size=40", "extract.dtype=float16", "run.seed=1",  # seed: random init
])
def test_feature_settings_change_the_key(tiny_cfg, change):
    assert keys(tiny_cfg(change))[0] != keys(tiny_cfg())[0]


def test_weights_file_bytes_change_the_key(tiny_cfg, weights_file):
    before = keys(tiny_cfg(f"backbone.weights={weights_file}"))
    weights_file.write_bytes(b"weights, version 2")
    after = keys(tiny_cfg(f"backbone.weights={weights_file}"))
    assert before[0] != after[0]
    # with real weights the seed is not a feature setting any more
    assert keys(tiny_cfg(f"backbone.weights={weights_file}", "run.seed=5"))[0] == after[0]


@pytest.mark.parametrize("field, value", [("resize_size", 99), ("crop_size", 31), ("mean", (0.5, 0.5, 0.5)),
                                          ("std", (0.2, 0.2, 0.2)), ("interpolation", "bicubic")])
def test_every_preprocessing_parameter_changes_the_key(tiny_cfg, field, value):
    cfg = tiny_cfg()
    spec = resolve_backbone(cfg.backbone, cfg.run.seed)
    other = dataclasses.replace(spec, preprocess=dataclasses.replace(spec.preprocess, **{field: value}))
    assert fc.digest(ex.feature_config(other, "float32")) != fc.digest(ex.feature_config(spec, "float32"))


@pytest.mark.parametrize("target, attr, value", [
    (torch, "__version__", "2.99.0"), (torchvision, "__version__", "0.99.0"),
    (cache_key, "FORMAT_VERSION", 99), (imgdata, "DECODE_VERSION", 99)])
def test_versions_change_the_key(tiny_cfg, monkeypatch, target, attr, value):
    before = keys(tiny_cfg())[0]
    monkeypatch.setattr(target, attr, value)
    assert keys(tiny_cfg())[0] != before


def test_patch_releases_of_torch_keep_the_key(tiny_cfg, monkeypatch):
    before = keys(tiny_cfg())[0]
    major_minor = ".".join(torch.__version__.split(".")[:2])
    monkeypatch.setattr(torch, "__version__", major_minor + ".99+local")
    assert keys(tiny_cfg())[0] == before


@pytest.mark.parametrize("change", [
    "head.lr=0.5", "head.epochs=9", "head.batch_size=2", "head.momentum=0.5", "head.weight_decay=0.1",
    "head.step_size=2", "head.gamma=0.5", "logistic.c_grid=[3.0]", "logistic.cv_folds=4", "logistic.max_iter=5",
    "finetune.lr=0.3", "finetune.epochs=4", "finetune.augment=false", "run.name=other", "run.output_dir=elsewhere",
    "run.stages=[\"head\"]", "run.num_threads=1", "run.trust_artifacts=true", "data.num_workers=2",
    "data.max_bad_fraction=0.5", "extract.batch_size=3", "extract.chunk_size=5", "extract.verify=content",
    "extract.lock_timeout=0"])
def test_head_only_settings_keep_the_key(tiny_cfg, change):
    assert keys(tiny_cfg(change)) == keys(tiny_cfg())


def test_cache_dir_moves_the_file_not_the_key(tiny_cfg, tmp_path):
    other = tiny_cfg(f"extract.cache_dir={tmp_path / 'b'}")
    a, b = ex.plan_cache(ex.ExtractJob.of(tiny_cfg())), ex.plan_cache(ex.ExtractJob.of(other))
    assert a.key == b.key and a.path.name == b.path.name and a.path != b.path


def edit_bytes(root):
    Image.new("RGB", (24, 24), (1, 2, 3)).save(root / "train" / "ants" / "img_000.png")


def stored_png(path, colour):
    """An uncompressed PNG: its size depends only on its dimensions."""
    Image.new("RGB", (24, 24), colour).save(path, compress_level=0)


def edit_restoring_size_and_mtime(root):
    path = root / "train" / "ants" / "stored.png"
    st = path.stat()
    stored_png(path, (200, 0, 0))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def rename(root):
    os.rename(root / "val" / "bees" / "img_000.png", root / "val" / "bees" / "renamed.png")


def relabel(root):
    os.rename(root / "train" / "ants" / "img_001.png", root / "train" / "bees" / "was_ant.png")


def add(root):
    Image.new("RGB", (24, 24), (9, 9, 9)).save(root / "val" / "ants" / "new.png")


def remove(root):
    os.remove(root / "train" / "bees" / "img_005.png")


@pytest.mark.parametrize("edit, n_read", [(edit_bytes, 1), (edit_restoring_size_and_mtime, 1), (rename, 1),
                                          (relabel, 1), (add, 1), (remove, 0)])
def test_image_changes_change_the_key_not_the_config_key(tiny_cfg, image_root, monkeypatch, edit, n_read):
    monkeypatch.setattr("pipeline.scan.RACY_SECONDS", 0.0)  # let the stat fast path trust fresh files
    stored_png(image_root / "train" / "ants" / "stored.png", (0, 200, 0))
    config_key, key = keys(tiny_cfg())
    assert ex.plan_cache(ex.ExtractJob.of(tiny_cfg())).scan.n_hashed == 0  # the stat index answers for unchanged files
    edit(image_root)
    plan = ex.plan_cache(ex.ExtractJob.of(tiny_cfg()))
    assert plan.config_key == config_key and plan.key != key
    assert plan.scan.n_bad == 0 and plan.scan.n_hashed == n_read  # only the changed files were read


def test_a_miss_says_what_changed_in_the_images(tiny_cfg, image_root):
    ex.run_extract(tiny_cfg(), CPU := torch.device("cpu"))
    for edit in (edit_bytes, rename, relabel, add, remove):
        edit(image_root)
    entry = ex.run_extract(tiny_cfg(), CPU)
    assert entry["miss_reason"] == ("images changed (train: 1 added, 2 removed, 1 changed or relabelled; "
                                    "val: 2 added, 1 removed, 0 changed or relabelled)")


def test_weights_change_is_named_in_the_miss(tiny_cfg, weights_file, monkeypatch):
    from pipeline import backbones

    # Building from the fake file is not needed: the extractor comes from random weights, the key from the file.
    real_build = backbones.build_network
    monkeypatch.setattr(backbones, "build_network",
                        lambda cfg, spec, seed=None: real_build(dataclasses.replace(cfg, weights="none"), spec, seed))
    ex.run_extract(tiny_cfg(f"backbone.weights={weights_file}"), torch.device("cpu"))
    weights_file.write_bytes(b"weights, version 2")
    entry = ex.run_extract(tiny_cfg(f"backbone.weights={weights_file}"), torch.device("cpu"))
    assert entry["cache_hit"] is False and entry["miss_reason"] == "weights changed"


@pytest.mark.parametrize("autocast", ["float16", "bfloat16"])
def test_autocast_changes_the_key(tiny_cfg, autocast):
    assert keys(tiny_cfg(f"extract.autocast={autocast}"))[0] != keys(tiny_cfg())[0]
