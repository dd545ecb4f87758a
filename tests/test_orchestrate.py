"""Heads from a cache file alone (features.file): no image tree, no backbone run, same results."""
import json
import shutil

import pytest
import torch

from pipeline import PipelineError
from pipeline import cache as fc

CPU = torch.device("cpu")


def no_images(*args, **kwargs):
    raise AssertionError("an image was opened in features.file mode")


def test_head_logistic_and_report_run_from_the_cache_file_with_the_images_deleted(tiny_cfg, image_root,
                                                                                   tmp_path, monkeypatch):
    from pipeline.extract import run_extract
    from pipeline.head import run_head
    from pipeline.logistic import run_logistic
    from pipeline.report import run_report

    with_images = tiny_cfg("report.enabled=true", "report.grid_images=4")
    cache_file = run_extract(with_images, CPU)["cache_file"]
    head_before = run_head(with_images, CPU)
    logistic_before = run_logistic(with_images, CPU)
    shutil.rmtree(image_root)
    monkeypatch.setattr("PIL.Image.open", no_images)
    alone = tiny_cfg("report.enabled=true", "report.grid_images=4", f"features.file={cache_file}",
                     "data.root=/nonexistent/images", "backbone.name=vgg11", "run.name=alone")
    head = run_head(alone, CPU)
    logistic = run_logistic(alone, CPU)
    # the file's backbone is used, not backbone.name from the params; results are those of the image-tree run
    assert head["val_acc"] == head_before["val_acc"] and head["history"] == head_before["history"]
    assert logistic["val_acc"] == logistic_before["val_acc"] and logistic["C"] == logistic_before["C"]
    saved = torch.load(alone.run_dir / "head.pt", weights_only=False)
    assert saved["backbone"]["name"] == "resnet18" and saved["cache_key"] == fc.open_cache(cache_file).key
    before = torch.load(with_images.run_dir / "head.pt", weights_only=False)
    assert all(torch.equal(saved["state_dict"][k], before["state_dict"][k]) for k in before["state_dict"])
    out = run_report(alone, CPU)
    assert set(out) == {"head", "logistic"}
    assert out["head"]["val_acc_top1"] == head["val_acc_top1"]
    metrics = json.loads((alone.run_dir / "metrics.json").read_text())
    assert "extract" not in metrics  # nothing was extracted, nothing scanned


def test_open_cache_needs_no_image_tree_and_carries_what_predict_needs(tiny_cfg, image_root):
    from pipeline.extract import run_extract

    cfg = tiny_cfg()
    path = run_extract(cfg, CPU)["cache_file"]
    shutil.rmtree(image_root)
    features = fc.open_cache(path)
    assert features.classes == ("ants", "bees")
    assert features.shapes() == {"train": (12, 512), "val": (6, 512)}
    assert list(features.manifests["val"].labels) == [0, 0, 0, 1, 1, 1]
    assert features.manifests["val"].paths[0] == "val/ants/img_000.png"
    assert features.backbone["name"] == "resnet18" and features.backbone["preprocess"]["crop_size"] == 32
    assert features.backbone_config == {"name": "resnet18", "weights": "none", "image_size": 32, "cut": "pool"}
    assert features.seed == cfg.run.seed and features.load().train.features.shape == (12, 512)
    with pytest.raises(fc.CacheError, match="does not match the current data"):
        fc.open_cache(path, "0" * 64)


def test_a_cache_without_its_backbone_cannot_be_used_alone(tmp_path):
    import numpy as np
    from tests.conftest import write_feature_cache

    x = np.ones((4, 3), dtype=np.float32)
    write_feature_cache(tmp_path / "c.h5", {"train": (x, np.array([0, 0, 1, 1])), "val": (x[:2], np.array([0, 1]))},
                        ["a", "b"])
    with pytest.raises(fc.CacheError, match="does not record its backbone"):
        fc.open_cache(tmp_path / "c.h5")


def test_a_missing_features_file_names_the_key(tiny_cfg, tmp_path):
    from pipeline.head import run_head

    cfg = tiny_cfg(f"features.file={tmp_path / 'nope.h5'}")
    with pytest.raises(PipelineError, match="features.file .*nope.h5' is not a file"):
        run_head(cfg, CPU)
    assert not cfg.run_dir.exists()


def test_view_bank_from_the_file_alone_is_read_not_built(tiny_cfg, image_root):
    from pipeline.extract import run_extract
    from pipeline.head import run_head

    path = run_extract(tiny_cfg("extract.train_views=2"), CPU)["cache_file"]
    shutil.rmtree(image_root)
    entry = run_head(tiny_cfg("extract.train_views=2", f"features.file={path}"), CPU)
    assert 0.0 <= entry["val_acc"] <= 1.0
    with pytest.raises(PipelineError, match="building one needs the images"):
        run_head(tiny_cfg("extract.train_views=3", f"features.file={path}"), CPU)


def test_a_sweep_runs_from_the_cache_file_with_the_images_deleted(tiny_cfg, image_root, monkeypatch):
    """The sweep, like head and logistic, needs only the cache file: no image opened, nothing scanned."""
    from pipeline.extract import run_extract
    from pipeline.sweep_stage import run_sweep

    grid = 'sweep.grid={"linear": {"lr": [0.01, 0.1]}, "ncm": {}, "knn": {"k": [3]}}'
    cache_file = run_extract(tiny_cfg(), CPU)["cache_file"]
    with_images = run_sweep(tiny_cfg(grid), CPU)
    shutil.rmtree(image_root)
    monkeypatch.setattr("PIL.Image.open", no_images)
    alone = tiny_cfg(grid, "report.enabled=true", "report.grid_images=4", f"features.file={cache_file}",
                     "data.root=/nonexistent/images", "run.name=alone")
    entry = run_sweep(alone, CPU)
    assert entry["val_acc"] == with_images["val_acc"] and entry["head_type"] == with_images["head_type"]
    saved = torch.load(alone.run_dir / "head.pt", weights_only=False)
    assert saved["cache_key"] == fc.open_cache(cache_file).key
    assert (alone.run_dir / "sweep.json").is_file()
    assert "extract" not in json.loads((alone.run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("stage", ["head", "logistic", "sweep"])
def test_a_stage_that_extracts_first_does_not_count_the_extraction_as_its_own(tiny_cfg, monkeypatch, stage):
    """The extract entry has the extraction's seconds; the stage's entry (and the ledger's) only its own."""
    import time

    from pipeline import extract
    from pipeline.head import run_head
    from pipeline.head_outputs import ledger_path
    from pipeline.ledger import read_ledger
    from pipeline.logistic import run_logistic
    from pipeline.sweep_stage import run_sweep

    real_clock, real_ensure, skew = time.perf_counter, extract.ensure_cache, [0.0]

    def slow_ensure(*args, **kwargs):                 # as if the extraction had taken 1000 s longer
        plan, entry = real_ensure(*args, **kwargs)
        skew[0] += 1000.0
        return plan, {**entry, "seconds": entry["seconds"] + 1000.0}

    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + skew[0])
    monkeypatch.setattr(extract, "ensure_cache", slow_ensure)
    run = {"head": run_head, "logistic": run_logistic, "sweep": run_sweep}[stage]
    cfg = tiny_cfg('sweep.grid={"linear": {"lr": [0.01]}, "ncm": {}}')
    entry = run(cfg, CPU)
    metrics = json.loads((cfg.run_dir / "metrics.json").read_text())
    assert metrics["extract"]["seconds"] > 1000 and not metrics["extract"]["cache_hit"]
    assert 0 <= entry["seconds"] < 1000
    assert 0 <= metrics["head" if stage == "sweep" else stage]["seconds"] < 1000
    ledger = read_ledger(ledger_path(cfg.run.output_dir)).entries
    assert ledger and all(0 <= e.seconds < 1000 for e in ledger)


def test_a_view_bank_built_for_the_head_is_the_extract_entrys_time(tiny_cfg, monkeypatch):
    """head with extract.train_views and no bank yet: the bank's build is in the extract entry (views_seconds)."""
    import time

    from pipeline import views
    from pipeline.extract import run_extract
    from pipeline.head import run_head
    from pipeline.metrics import format_results

    run_extract(tiny_cfg(), CPU)                        # the cache, but no bank
    real_clock, real_extract, skew = time.perf_counter, views.extract_views, [0.0]

    def slow_views(*args, **kwargs):                   # as if the bank had taken 1000 s longer
        out = real_extract(*args, **kwargs)
        skew[0] += 1000.0
        return out

    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + skew[0])
    monkeypatch.setattr(views, "extract_views", slow_views)
    cfg = tiny_cfg("extract.train_views=2", "head.epochs=2")
    entry = run_head(cfg, CPU)
    extract_entry = json.loads((cfg.run_dir / "metrics.json").read_text())["extract"]
    assert 0 <= entry["seconds"] < 1000
    assert extract_entry["views_built"] and extract_entry["views_seconds"] > 1000
    assert extract_entry["train_views"] == 2 and extract_entry["cache_hit"]
    assert "2 views per train image built in" in format_results({"extract": extract_entry})
    again = run_extract(cfg, CPU)                       # the extract stage itself: a bank hit, its seconds
    assert not again["views_built"] and 0 <= again["views_seconds"] < 1000


def test_a_cache_damaged_between_its_check_and_its_open_is_extracted_again_and_counted(tiny_cfg, monkeypatch,
                                                                                     capsys):
    """ensure_cache finds the cache fresh, then the file is damaged before the stage opens it: the stage
    extracts again; the extract entry (and a view bank built after it) is the new extraction's, and the
    stage's own seconds leave both extractions out."""
    import time

    from pipeline import extract
    from pipeline.extract import run_extract
    from pipeline.head import run_head

    run_extract(tiny_cfg(), CPU)
    real_clock, real_ensure, skew, calls = time.perf_counter, extract.ensure_cache, [0.0], []

    def ensure_then_damage(*args, **kwargs):
        plan, entry = real_ensure(*args, **kwargs)
        calls.append(entry["cache_hit"])
        if len(calls) == 1:
            plan.path.write_bytes(b"not an HDF5 file")      # replaced after the check, before the open
        else:
            skew[0] += 1000.0                              # as if the extraction again had taken 1000 s longer
            entry = {**entry, "seconds": entry["seconds"] + 1000.0}
        return plan, entry

    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + skew[0])
    monkeypatch.setattr(extract, "ensure_cache", ensure_then_damage)
    cfg = tiny_cfg("extract.train_views=2", "head.epochs=2")
    entry = run_head(cfg, CPU)
    assert calls == [True, False]
    assert "extracting again" in capsys.readouterr().out
    extract_entry = json.loads((cfg.run_dir / "metrics.json").read_text())["extract"]
    assert not extract_entry["cache_hit"] and extract_entry["seconds"] > 1000     # the extraction again
    assert extract_entry["views_built"] and extract_entry["train_views"] == 2
    assert 0 <= entry["seconds"] < 1000


def flip_a_feature_byte(path) -> None:
    """One byte inside the train features (not the file's structure): it opens, its checksum fails on read."""
    import h5py

    with h5py.File(path, "r") as f:
        ds = f["train/features"]
        offset = ds.id.get_offset() if ds.chunks is None else ds.id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    data[offset + 10] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("budget", [None, "head.max_memory_gb=0.000001"])    # in memory, streamed
def test_a_damaged_features_file_is_named_and_left_as_it_is(tiny_cfg, tmp_path, budget):
    from pipeline.extract import run_extract
    from pipeline.head import run_head

    path = tmp_path / "alone.h5"
    shutil.copyfile(run_extract(tiny_cfg(), CPU)["cache_file"], path)
    flip_a_feature_byte(path)
    damaged = path.read_bytes()
    cfg = tiny_cfg(f"features.file={path}", "run.name=alone", *([budget] if budget else []))
    with pytest.raises(fc.CacheError) as e:
        run_head(cfg, CPU)
    assert str(path) in str(e.value) and "extract it again" in str(e.value)
    assert ("is not changed by this tool" if budget is None else "was left as it is") in str(e.value)
    assert path.read_bytes() == damaged and not (cfg.run_dir / "head.pt").exists()


def test_a_cache_found_damaged_while_streaming_is_removed_and_the_stage_says_to_run_again(tiny_cfg):
    from pathlib import Path

    from pipeline.extract import run_extract
    from pipeline.head import run_head

    path = Path(run_extract(tiny_cfg(), CPU)["cache_file"])
    flip_a_feature_byte(path)
    cfg = tiny_cfg("head.max_memory_gb=0.000001")
    with pytest.raises(fc.CacheError, match="the damaged cache was removed: run the stage again"):
        run_head(cfg, CPU)
    assert not path.exists() and not (cfg.run_dir / "head.pt").exists()
    assert run_head(cfg, CPU)["streamed"]                               # run again: extracted anew, then trained
    assert fc.is_intact(path)


def _replaced_before_streaming(monkeypatch, path) -> list:
    """Writes garbage over path just before the first time it is opened for streaming; returns the opens."""
    from pipeline.cache import stream

    real, opens = stream.open_features, []

    def open_features(file, *args, **kwargs):
        opens.append(str(file))
        if len(opens) == 1:
            path.write_bytes(b"not an HDF5 file")      # replaced after the stage opened it, before streaming
        return real(file, *args, **kwargs)

    monkeypatch.setattr(stream, "open_features", open_features)
    return opens


def test_a_cache_replaced_before_streaming_is_extracted_again_and_streamed(tiny_cfg, monkeypatch, capsys):
    from pathlib import Path

    from pipeline.extract import run_extract
    from pipeline.head import run_head

    path = Path(run_extract(tiny_cfg(), CPU)["cache_file"])
    opens = _replaced_before_streaming(monkeypatch, path)
    cfg = tiny_cfg("head.max_memory_gb=0.000001", "head.epochs=2")
    entry = run_head(cfg, CPU)
    assert entry["streamed"] and opens == [str(path), str(path)] and fc.is_intact(path)
    assert "extracting again" in capsys.readouterr().out
    assert not json.loads((cfg.run_dir / "metrics.json").read_text())["extract"]["cache_hit"]


def test_a_features_file_replaced_before_streaming_is_named_and_left_as_it_is(tiny_cfg, tmp_path, monkeypatch):
    from pipeline.extract import run_extract
    from pipeline.head import run_head

    path = tmp_path / "alone.h5"
    shutil.copyfile(run_extract(tiny_cfg(), CPU)["cache_file"], path)
    _replaced_before_streaming(monkeypatch, path)
    cfg = tiny_cfg(f"features.file={path}", "run.name=alone", "head.max_memory_gb=0.000001")
    with pytest.raises(fc.CacheError) as e:
        run_head(cfg, CPU)
    assert str(path) in str(e.value) and "features.file is not changed by this tool: extract it again" in str(e.value)
    assert path.read_bytes() == b"not an HDF5 file" and not (cfg.run_dir / "head.pt").exists()
