"""Splits users have: val/ valid/ validation/ or data.val_dir, an optional test/, train-only datasets, leaks."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipeline import PipelineError
from pipeline import cache as fc
from pipeline.folders import IMG_EXTENSIONS, discover_image_folder
from tests.conftest import make_image_folder

CPU = torch.device("cpu")


def make_layout(root: Path, val_name: str = "validation", test: bool = True, n_train: int = 4, n_val: int = 2,
                n_test: int = 2) -> Path:
    """root/train, root/<val_name> and (optionally) root/test, each with the classes ants and bees."""
    make_image_folder(root, n_train=n_train, n_val=n_val, seed=0)
    if val_name != "val":
        (root / "val").rename(root / val_name)
    if test:
        other = make_image_folder(root.parent / f"{root.name}-test", n_train=1, n_val=n_test, seed=1)
        (other / "val").rename(root / "test")
        shutil.rmtree(other)
    return root


def test_image_extensions_are_torchvisions():
    from torchvision.datasets.folder import IMG_EXTENSIONS as TORCHVISION

    assert IMG_EXTENSIONS == TORCHVISION


@pytest.mark.parametrize("name", ["val", "valid", "validation"])
def test_the_val_folder_is_found_by_its_usual_names_and_test_is_optional(tmp_path, name):
    root = make_layout(tmp_path / "d", name, test=name == "validation")
    data = discover_image_folder(root)
    assert data.val_dir == name and len(data.val) == 4
    assert all(p.startswith(f"{name}/") for p in data.val.paths)
    if name == "validation":
        assert data.splits == ("train", "val", "test") and len(data.test) == 4
        assert data.test.paths[0] == "test/ants/img_000.png" and data.test.labels == (0, 0, 1, 1)
    else:
        assert data.splits == ("train", "val") and data.test is None


def test_val_dir_names_any_folder_and_a_missing_one_lists_the_folders(tmp_path):
    root = make_layout(tmp_path / "d", "dev", test=False)
    with pytest.raises(PipelineError, match=r"has no val folder \(looked for val/, valid/, validation/; folders "
                                            r"there: dev/, train/\): set data.val_dir"):
        discover_image_folder(root)
    assert discover_image_folder(root, val_dir="dev").val_dir == "dev"
    with pytest.raises(PipelineError, match="data.val_dir 'holdout': no folder"):
        discover_image_folder(root, val_dir="holdout")


def test_a_test_folder_with_other_classes_is_one_line(tmp_path):
    root = make_layout(tmp_path / "d")
    (root / "test" / "wasps").mkdir()
    with pytest.raises(PipelineError, match=r"class 'wasps' is in '.*test' but not in '.*train'"):
        discover_image_folder(root)
    shutil.rmtree(root / "test" / "wasps")
    shutil.rmtree(root / "test" / "bees")
    with pytest.raises(PipelineError, match=r"class 'bees' is in '.*train' but not in '.*test' \(test/ must hold"):
        discover_image_folder(root)


def test_a_val_folder_and_val_fraction_together_is_an_error(tmp_path):
    root = make_layout(tmp_path / "d", "valid", test=False)
    with pytest.raises(PipelineError, match="data.val_fraction is set, but data.root .* has a val folder 'valid/'"):
        discover_image_folder(root, split_train=True)
    shutil.rmtree(root / "valid")
    data = discover_image_folder(root, split_train=True)
    assert data.val_dir == "" and len(data.val) == 0 and len(data.train) == 8


def test_test_split_is_extracted_and_read_from_the_file_alone(tiny_cfg, tmp_path):
    from pipeline.extract import run_extract
    from pipeline.orchestrate import stage_features

    root = make_layout(tmp_path / "d")
    entry = run_extract(tiny_cfg(f"data.root={root}"), CPU)
    features = fc.open_cache(entry["cache_file"])
    assert features.splits == ("train", "val", "test")
    assert features.shapes() == {"train": (8, 512), "val": (4, 512), "test": (4, 512)}
    assert features.split_rule == {"val": "folder", "val_dir": "validation", "test": "folder"}
    loaded = features.load()
    shutil.rmtree(root)
    alone = stage_features(tiny_cfg(f"features.file={entry['cache_file']}", "data.root=/nonexistent"), CPU)
    assert alone.images is None and alone.test.paths == loaded.test.paths
    assert (alone.test.features == loaded.test.features).all() and list(alone.test.labels) == [0, 0, 1, 1]


def test_an_old_two_split_cache_has_no_test(tiny_cfg):
    from pipeline.extract import run_extract
    from pipeline.orchestrate import stage_features

    cfg = tiny_cfg()
    entry = run_extract(cfg, CPU)
    assert fc.open_cache(entry["cache_file"]).test is None
    assert stage_features(cfg, CPU).test is None and entry["leaked_images"] == 0


def test_images_in_two_splits_are_reported_with_their_paths_and_counted(tiny_cfg, tmp_path, capsys):
    from pipeline.extract import run_extract

    root = make_layout(tmp_path / "d")
    shutil.copy(root / "train" / "ants" / "img_001.png", root / "validation" / "ants" / "copy.png")
    shutil.copy(root / "train" / "bees" / "img_000.png", root / "test" / "bees" / "again.png")
    entry = run_extract(tiny_cfg(f"data.root={root}"), CPU)
    out = capsys.readouterr().out
    assert "warning: 2 image(s) appear in more than one split" in out
    assert "train:train/ants/img_001.png = val:validation/ants/copy.png" in out
    assert "train:train/bees/img_000.png = test:test/bees/again.png" in out
    assert entry["leaked_images"] == 2
