import h5py
import numpy as np
import pytest

from pipeline import cache as fc
from pipeline.cache.freshness import _describe_config_change


def manifest(paths, labels):
    return fc.SplitManifest(tuple(paths), tuple(labels), tuple(f"{i:064x}" for i in range(len(paths))))


def write(path, config_key="c", manifests=None):
    """A complete cache; its key is derived from config_key and the rows, as the writer records it."""
    manifests = manifests or {"train": manifest(["train/a/1.png", "train/b/2.png"], [0, 1]),
                              "val": manifest(["val/a/3.png"], [0])}
    with fc.CacheWriter(path, feature_dim=3, dtype="float32") as w:
        for split, m in manifests.items():
            w.create_split(split, m)
            w.write_rows(split, 0, np.arange(len(m) * 3, dtype=np.float32).reshape(len(m), 3))
        w.commit({"format_version": fc.FORMAT_VERSION, "config_key": config_key, "classes": ["a", "b"]})
    return manifests, fc.cache_key(config_key, fc.manifest_digest(("a", "b"), manifests))


def test_roundtrip(tmp_path):
    path = tmp_path / "c.h5"
    _, key = write(path)
    cache = fc.read_cache(path, key=key)
    assert cache.classes == ("a", "b") and cache.feature_dim == 3
    assert cache.train.paths == ["train/a/1.png", "train/b/2.png"]
    assert cache.train.labels.tolist() == [0, 1]
    assert np.array_equal(cache.train.features, np.arange(6, dtype=np.float32).reshape(2, 3))
    assert not list(tmp_path.glob(".*.tmp"))


def test_failed_write_keeps_previous_cache_and_removes_temp(tmp_path):
    path = tmp_path / "c.h5"
    write(path, config_key="old")
    with pytest.raises(RuntimeError):
        with fc.CacheWriter(path, feature_dim=3, dtype="float32") as w:
            w.create_split("train", manifest(["x"], [0]))
            raise RuntimeError("killed mid-write")
    assert fc.read_cache(path).attrs["config_key"] == "old"
    assert not list(tmp_path.glob(".*.tmp"))


def test_file_without_completion_marker_is_not_a_cache(tmp_path):
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        f.attrs["key"] = "k"
    assert fc.read_attrs(path) is None
    with pytest.raises(fc.CacheError, match="incomplete"):
        fc.read_cache(path)


def test_structure_is_checked_before_reading(tmp_path):
    path = tmp_path / "c.h5"
    write(path)
    with h5py.File(path, "a") as f:
        del f["val/paths"]
    with pytest.raises(fc.CacheError, match="no dataset 'val/paths'"):
        fc.read_cache(path)


def test_missing_cache_says_run_extract(tmp_path):
    with pytest.raises(fc.CacheError, match="run the extract stage"):
        fc.read_cache(tmp_path / "none.h5")


def test_miss_reasons(tmp_path):
    path = tmp_path / "c.h5"
    old, k1 = write(path, config_key="c1")
    assert fc.miss_reason(path, k1, "c1", old) is None
    assert "backbone, weights or preprocessing" in fc.miss_reason(path, "k2", "c2", old)
    new = dict(old)
    new["train"] = fc.SplitManifest(("train/a/1.png", "train/b/9.png", "train/b/10.png"), (0, 1, 1),
                                    (old["train"].sha256[0], "f" * 64, "e" * 64))
    assert fc.miss_reason(path, "k2", "c1", new) == "images changed (train: 2 added, 1 removed, 0 changed or relabelled)"
    relabelled = dict(old)
    relabelled["val"] = fc.SplitManifest(("val/a/3.png",), (1,), old["val"].sha256)
    assert "val: 0 added, 0 removed, 1 changed" in fc.miss_reason(path, "k3", "c1", relabelled)
    assert fc.miss_reason(tmp_path / "other.h5", "k", "c", old) == "no complete cache file yet"


def test_manifest_hashes_bytes(tmp_path):
    (tmp_path / "a.png").write_bytes(b"one")
    m1 = fc.build_manifest(tmp_path, ("a.png",), (0,))
    (tmp_path / "a.png").write_bytes(b"two")
    m2 = fc.build_manifest(tmp_path, ("a.png",), (0,))
    assert m1.sha256 != m2.sha256
    assert fc.manifest_digest(("a",), {"train": m1}) != fc.manifest_digest(("a",), {"train": m2})


def test_float16_storage(tmp_path):
    with fc.CacheWriter(tmp_path / "h.h5", feature_dim=2, dtype="float16") as w:
        for split in fc.SPLITS:
            w.create_split(split, manifest(["p"], [0]))
            w.write_rows(split, 0, np.array([[0.5, 1.5]], dtype=np.float32))
        w.commit({"config_key": "c", "classes": ["a"]})
    cache = fc.read_cache(tmp_path / "h.h5")
    assert cache.train.features.dtype == np.float16 and cache.train.features.tolist() == [[0.5, 1.5]]


def test_config_changes_are_described():
    old = {"format_version": 2, "backbone": "resnet18", "weights": "a", "dtype": "float32",
           "preprocess": {"crop_size": 32, "resize_size": 37, "mean": [0.5]}}
    assert _describe_config_change(old, {**old, "weights": "b"}) == "weights changed"
    assert _describe_config_change(old, {**old, "backbone": "vgg11", "dtype": "float16"}) == \
        "backbone changed (resnet18 -> vgg11), storage dtype changed (float32 -> float16)"
    assert _describe_config_change(old, {**old, "preprocess": {**old["preprocess"], "mean": [0.4]}}) == \
        "preprocessing changed (mean [0.5] -> [0.4])"
    assert _describe_config_change({"format_version": 1}, {**old, "cut": "pool"}) == "cache format changed (1 -> 2)"


# ----------------------------------------------------------------------------- streaming reader
def test_open_features_verifies_like_read_cache_and_reads_no_features(tmp_path, monkeypatch):
    path = tmp_path / "c.h5"
    manifests, key = write(path)
    with fc.open_features(path, key) as reader:
        assert reader.classes == ("a", "b") and reader.feature_dim == 3
        assert reader.train.n_rows == 2 and reader.train.paths == ["train/a/1.png", "train/b/2.png"]
        assert reader.train.labels.dtype == np.int64 and reader.train.labels.tolist() == [0, 1]
        assert reader.val.chunk_rows == 1  # a 1-row split is one 1-row chunk
        out = np.zeros((2, 3), dtype=np.float32)
        assert np.array_equal(reader.train.read_rows(0, 2, out), np.arange(6, dtype=np.float32).reshape(2, 3))
    with pytest.raises(fc.CacheError, match="does not match the current data"):
        fc.open_features(path, "0" * 64)
    with h5py.File(path, "a") as f:
        f["train/labels"][0] = 1
    with pytest.raises(fc.CacheError, match="manifest digest"):
        fc.open_features(path)


def test_read_rows_converts_a_float16_cache_exactly(tmp_path):
    from tests.conftest import write_feature_cache

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(600, 5)) * 100).astype(np.float32)
    write_feature_cache(tmp_path / "h.h5", {"train": (x, np.zeros(600, int)), "val": (x[:2], np.zeros(2, int))},
                        ["a"], dtype="float16")
    with fc.open_features(tmp_path / "h.h5") as reader:
        assert reader.train.chunk_rows == fc.ROW_CHUNK
        out = np.full((400, 5), np.nan, dtype=np.float32)
        rows = reader.train.read_rows(250, 530, out)  # spans three chunks
        assert rows.dtype == np.float32 and rows.shape == (280, 5)
        assert np.array_equal(rows, x[250:530].astype(np.float16).astype(np.float32))
        assert np.isnan(out[280:]).all()  # nothing written past the rows read
    assert fc.feature_shapes(tmp_path / "h.h5") == {"train": (600, 5), "val": (2, 5)}


def test_read_rows_raises_cache_error_on_a_failed_checksum(tmp_path):
    from tests.conftest import flip_feature_byte, write_feature_cache

    x = np.ones((600, 8), dtype=np.float32)
    write_feature_cache(tmp_path / "c.h5", {"train": (x, np.zeros(600, int)), "val": (x[:3], np.zeros(3, int))}, ["a"])
    flip_feature_byte(tmp_path / "c.h5", "train", chunk=1)
    with fc.open_features(tmp_path / "c.h5") as reader:  # opening reads no features: still fine
        out = np.empty((256, 8), dtype=np.float32)
        reader.train.read_rows(0, 256, out)
        with pytest.raises(fc.CacheError, match=r"cannot read rows 256\.\.511 of 'train/features'"):
            reader.train.read_rows(256, 512, out)
