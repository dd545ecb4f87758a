import os

import pytest

from pipeline import scan as sc
from pipeline import scan_index
from pipeline.data import discover_image_folder
from tests.conftest import make_image_folder


@pytest.fixture
def folder(tmp_path):
    root = make_image_folder(tmp_path / "imgs", n_train=3, n_val=2)
    (root / "train" / "ants" / "bad.png").write_bytes(b"")
    return root, tmp_path / "cache" / "scan.h5"


def scan(root, index, verify="stat", workers=0):
    return sc.scan_images(discover_image_folder(root), index, verify, workers)


def test_unchanged_files_are_not_read_again(folder, monkeypatch):
    monkeypatch.setattr(sc, "RACY_SECONDS", 0.0)
    root, index = folder
    first = scan(root, index)
    second = scan(root, index)
    assert first.n_hashed == 11 and second.n_hashed == 0
    assert second.manifests == first.manifests
    assert [b.path for b in second.bad] == ["train/ants/bad.png"]  # the verdict is remembered too


def test_touched_file_is_read_again_with_the_same_hash(folder, monkeypatch):
    monkeypatch.setattr(sc, "RACY_SECONDS", 0.0)
    root, index = folder
    first = scan(root, index)
    os.utime(root / "val" / "bees" / "img_001.png", ns=(1, 1))
    second = scan(root, index)
    assert second.n_hashed == 1 and second.manifests == first.manifests


def test_files_modified_just_now_are_not_trusted_by_stat(folder):
    root, index = folder  # the files were written a moment ago: within RACY_SECONDS
    scan(root, index)
    assert scan(root, index).n_hashed == 11


def test_verify_content_reads_everything_every_time(folder, monkeypatch):
    monkeypatch.setattr(sc, "RACY_SECONDS", 0.0)
    root, index = folder
    scan(root, index)
    assert scan(root, None, verify="content").n_hashed == 11


def test_damaged_index_is_ignored(folder, monkeypatch):
    monkeypatch.setattr(sc, "RACY_SECONDS", 0.0)
    root, index = folder
    first = scan(root, index)
    index.write_bytes(b"garbage")
    again = scan(root, index)
    assert again.n_hashed == 11 and again.manifests == first.manifests
    assert scan_index.read_scan_index(index)  # rewritten


def test_threads_give_the_same_rows(folder):
    root, _ = folder
    assert scan(root, None, workers=3).manifests == scan(root, None).manifests
