"""Val folder names, the content-hash split of a train-only dataset, leakage."""
from __future__ import annotations

import hashlib

import pytest

from pipeline import PipelineError
from pipeline.splits import (SplitError, carve_train, find_leaks, format_leaks, hash_file, resolve_val_dir,
                             split_by_content, split_score)


def digest(i) -> str:
    return hashlib.sha256(f"image {i}".encode()).hexdigest()


@pytest.mark.parametrize("name", ["val", "valid", "validation"])
def test_val_folder_names(tmp_path, name):
    (tmp_path / "train").mkdir()
    (tmp_path / name).mkdir()
    assert resolve_val_dir(tmp_path) == tmp_path / name


def test_val_folder_errors_name_the_folders_and_the_fix(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(SplitError, match=r"has no val folder \(looked for val/, valid/, validation/; folders "
                                         r"there: train/\): set data.val_dir"):
        resolve_val_dir(tmp_path)
    assert resolve_val_dir(tmp_path, required=False) is None
    (tmp_path / "dev").mkdir()
    assert resolve_val_dir(tmp_path, "dev") == tmp_path / "dev"
    with pytest.raises(SplitError, match="data.val_dir 'holdout': no folder"):
        resolve_val_dir(tmp_path, "holdout")
    (tmp_path / "val").mkdir()
    (tmp_path / "validation").mkdir()
    with pytest.raises(PipelineError, match=r"several val folders \(val/, validation/\): set data.val_dir"):
        resolve_val_dir(tmp_path)


def test_split_is_stratified_by_class_and_seeded():
    labels = [i % 3 for i in range(3000)]
    plan = split_by_content([digest(i) for i in range(3000)], labels, ["a", "b", "c"], 0.2, 0.1, seed=0)
    for c in "abc":
        n = plan.counts[c]
        assert sum(n.values()) == 1000
        assert abs(n["val"] - 200) < 45 and abs(n["test"] - 100) < 35   # about 3 standard deviations
    other = split_by_content([digest(i) for i in range(3000)], labels, ["a", "b", "c"], 0.2, 0.1, seed=1)
    assert plan.splits != other.splits
    again = split_by_content([digest(i) for i in range(3000)], labels, ["a", "b", "c"], 0.2, 0.1, seed=0)
    assert plan.splits == again.splits
    assert set(plan.indices("val")).isdisjoint(plan.indices("train"))


def test_adding_images_never_moves_an_existing_one():
    classes = ["a", "b"]
    before = split_by_content([digest(i) for i in range(200)], [i % 2 for i in range(200)], classes, 0.25)
    grown = split_by_content([digest(i) for i in range(1000)], [i % 2 for i in range(1000)], classes, 0.25)
    assert grown.splits[:200] == before.splits
    # nor does the order the images are listed in, or removing others: only the content counts
    subset = list(range(0, 1000, 7))[::-1]
    shuffled = split_by_content([digest(i) for i in subset], [i % 2 for i in subset], classes, 0.25)
    assert shuffled.splits == [grown.splits[i] for i in subset]


def test_identical_files_land_in_the_same_split(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"same bytes")
    (tmp_path / "copy.jpg").write_bytes(b"same bytes")
    a, b = hash_file(tmp_path / "x.jpg"), hash_file(tmp_path / "copy.jpg")
    assert a == b == hashlib.sha256(b"same bytes").hexdigest()
    assert split_score(a, 3) == split_score(b, 3) and 0 <= split_score(a, 3) < 1


def test_split_errors_and_warnings():
    with pytest.raises(SplitError, match="data.val_fraction = 0: must be a number in"):
        split_by_content([digest(1)], [0], ["a"], 0)
    with pytest.raises(SplitError, match="data.test_fraction = 0.6"):
        split_by_content([digest(1)], [0], ["a"], 0.5, 0.6)
    with pytest.raises(SplitError, match="class 'a' has 1 image"):
        one = next(i for i in range(100) if split_score(digest(i), 0) < 0.5)
        split_by_content([digest(one)], [0], ["a"], 0.5)
    train_only = next(i for i in range(100) if split_score(digest(i), 0) >= 0.5)
    plan = split_by_content([digest(train_only)], [0], ["a"], 0.5)
    assert plan.warnings == ["class 'a' has no val image (1 train): its val accuracy cannot be measured"]
    with pytest.raises(SplitError, match=r"data.val_fraction = 0.5 left no image of the 1 in train/ for val: raise"):
        carve_train([digest(train_only)], [0], ["a"], 0.5)


def test_leaks_are_contents_in_more_than_one_split_with_their_paths():
    leaks = find_leaks({"train": [("train/a/1.jpg", "d1"), ("train/a/2.jpg", "d2"), ("train/b/9.jpg", "d2")],
                        "val": [("val/a/1.jpg", "d1"), ("val/a/3.jpg", "d3")],
                        "test": [("test/b/4.jpg", "d2")]})
    assert [(l.digest, l.paths) for l in leaks] == [
        ("d1", {"train": ("train/a/1.jpg",), "val": ("val/a/1.jpg",)}),
        ("d2", {"train": ("train/a/2.jpg", "train/b/9.jpg"), "test": ("test/b/4.jpg",)})]
    text = format_leaks(leaks, limit=1)
    assert text.startswith("warning: 2 image(s) appear in more than one split")
    assert "train:train/a/1.jpg = val:val/a/1.jpg" in text and "... and 1 more" in text
    assert find_leaks({"train": [("a", "d1"), ("b", "d1")], "val": []}) == [] and format_leaks([]) == ""


# ----------------------------------------------------------------------------- wired into extraction
def _train_only(tmp_path, n: int, seed: int = 0):
    import shutil

    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path / f"imgs-{seed}", n_train=n, n_val=0, seed=seed)
    shutil.rmtree(root / "val")
    return root


def _splits_of(manifests) -> dict:
    return {path: split for split, m in manifests.items() for path in m.paths}


def test_a_train_only_dataset_is_split_by_content_and_adding_images_moves_none(tiny_cfg, tmp_path):
    import shutil

    import torch

    from pipeline import cache as fc
    from pipeline.extract import ExtractJob, ensure_cache

    cpu = torch.device("cpu")
    root = _train_only(tmp_path, 10)
    cfg = tiny_cfg(f"data.root={root}", "data.val_fraction=0.3", "data.test_fraction=0.2", "data.split_seed=5")
    plan, entry = ensure_cache(ExtractJob.of(cfg), cpu)
    before = _splits_of(plan.manifests)
    assert set(before.values()) == {"train", "val", "test"} and len(before) == 20
    assert all(p.startswith("train/") for p in before)  # every image stays where it is on disk
    rule = {"val": "content", "val_fraction": 0.3, "test": "content", "test_fraction": 0.2, "seed": 5}
    cached = fc.open_cache(entry["cache_file"])
    assert cached.split_rule == rule and cached.splits == ("train", "val", "test")
    assert cached.test is not None and len(cached.test.paths) == len(plan.manifests["test"])
    # finetune's view of the same data (it hashes the files itself) is the same split
    from pipeline.data import load_dataset

    seen = load_dataset(cfg.data)
    assert {s: seen.split(s).paths for s in seen.splits} == {s: m.paths for s, m in plan.manifests.items()}
    # add 8 images per class: no existing image changes split, and no existing row goes through the backbone again
    more = _train_only(tmp_path, 8, seed=1)
    for cls in ("ants", "bees"):
        for f in (more / "train" / cls).iterdir():
            shutil.copy(f, root / "train" / cls / f"new_{f.name}")
    plan2, entry2 = ensure_cache(ExtractJob.of(cfg), cpu)
    after = _splits_of(plan2.manifests)
    assert len(after) == 36 and {p: after[p] for p in before} == before
    assert entry2["rows_extracted"] == 16 and entry2["rows_reused"] == 20
    # a changed fraction is a miss that says so, and reuses every row's features
    plan3, entry3 = ensure_cache(ExtractJob.of(tiny_cfg(f"data.root={root}", "data.val_fraction=0.5",
                                                        "data.split_seed=5")), cpu)
    assert entry3["miss_reason"].startswith("the split changed (test content -> none, test_fraction 0.2 -> 0.0, "
                                            "val_fraction 0.3 -> 0.5): ")
    assert entry3["rows_extracted"] == 0 and "test" not in plan3.manifests


def test_split_settings_that_cannot_be_used_are_one_line(tiny_cfg, tmp_path, image_root):
    import shutil

    import torch

    from pipeline import PipelineError
    from pipeline.extract import ExtractJob, ensure_cache

    cpu = torch.device("cpu")
    with pytest.raises(PipelineError, match="data.val_fraction is set, but data.root .* has a val folder 'val/'"):
        ensure_cache(ExtractJob.of(tiny_cfg("data.val_fraction=0.2")), cpu)
    with pytest.raises(PipelineError, match="data.test_fraction = 0.2 splits train/ and needs data.val_fraction"):
        ensure_cache(ExtractJob.of(tiny_cfg("data.test_fraction=0.2")), cpu)
    root = _train_only(tmp_path, 3)
    with pytest.raises(PipelineError, match=r"has no val folder .*set data.val_dir to its name, or "
                                            r"data.val_fraction to split train"):
        ensure_cache(ExtractJob.of(tiny_cfg(f"data.root={root}")), cpu)
    shutil.copytree(root / "train", root / "test")
    with pytest.raises(PipelineError, match="data.test_fraction is set, but data.root .* has a test/ folder"):
        ensure_cache(ExtractJob.of(tiny_cfg(f"data.root={root}", "data.val_fraction=0.3",
                                            "data.test_fraction=0.1")), cpu)


def test_a_changed_split_rule_is_named_in_the_miss_reason():
    from pipeline.cache.freshness import _split_change

    folder = {"val": "folder", "val_dir": "val", "test": "none"}
    content = {"val": "content", "val_fraction": 0.2, "test": "none", "test_fraction": 0.0, "seed": 0}
    assert _split_change(None, folder) is None and _split_change(folder, folder) is None  # files before the attribute
    assert _split_change(folder, content) == ("the split changed (val folder -> content, seed = 0, "
                                              "test_fraction = 0.0, val_fraction = 0.2)")
    assert _split_change(content, {**content, "seed": 3}) == "the split changed (seed 0 -> 3)"


def test_a_leak_is_warned_once_per_run_and_counted_by_every_stage(params_file, tmp_path, capsys):
    import shutil

    import run_pipeline
    from pipeline.metrics import read_metrics
    from tests.test_folders import make_layout

    root = make_layout(tmp_path / "d")
    shutil.copy(root / "train" / "ants" / "img_001.png", root / "validation" / "ants" / "copy.png")
    shutil.copy(root / "train" / "bees" / "img_000.png", root / "test" / "bees" / "again.png")
    args = ["--params", str(params_file), "--set", f"data.root={root}", "--set", "head.epochs=1"]
    assert run_pipeline.main(args + ["extract", "head", "logistic"]) == 0
    out = capsys.readouterr().out
    assert out.count("image(s) appear in more than one split") == 1          # by extract, the first to see it
    assert out.index("appear in more than one split") < out.index("head: best val_acc")
    metrics = read_metrics(tmp_path / "runs" / "t")
    assert [metrics[s]["leaked_images"] for s in ("extract", "head", "logistic")] == [2, 2, 2]
    assert run_pipeline.main(args + ["head"]) == 0                             # a new run warns again
    assert capsys.readouterr().out.count("image(s) appear in more than one split") == 1
    alone = ["--set", f"features.file={metrics['extract']['cache_file']}", "--set", "run.name=alone"]
    assert run_pipeline.main(args + alone + ["head", "logistic"]) == 0         # the cache file on its own
    assert capsys.readouterr().out.count("features.file: warning: 2 image(s) appear in more than one split") == 1
    metrics = read_metrics(tmp_path / "runs" / "alone")
    assert metrics["head"]["leaked_images"] == metrics["logistic"]["leaked_images"] == 2


def test_outside_a_run_every_report_is_printed_and_inside_one_each_once():
    from pipeline.splits import first_warning, one_leak_warning_per_run

    leaks = find_leaks({"train": [("a", "d1")], "val": [("b", "d1")]})
    other = find_leaks({"train": [("a", "d2")], "val": [("c", "d2")]})
    assert first_warning(leaks) and first_warning(leaks) and not first_warning([])
    with one_leak_warning_per_run():
        assert first_warning(leaks) and not first_warning(leaks) and first_warning(other)
    assert first_warning(leaks)
