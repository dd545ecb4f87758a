"""Damaged derived files: every byte of a cache, a chunk or a scan index flipped in turn is reported as
damage (a CacheError naming the file, or an ignored index), never another exception; the stage that
finds it discards the file and rebuilds it."""
import shutil

import numpy as np

from pipeline import cache as fc
from pipeline import scan_index
from tests import child
from tests.conftest import tiny_overrides, write_feature_cache

STEP = 37  # bytes between flipped offsets: every region of these small files is hit several times
CACHE_STEP = 53  # a complete cache is the biggest of them (~25 KB): still several hits per header, heap or chunk


def features(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def sweep(path, kind: str, step: int = STEP, **kw) -> dict:
    status, result = child.call(child.flip_sweep, str(path), kind, step, *kw.values())
    assert status == "ok", result
    assert not result["escaped"], result["escaped"]  # offset -> what escaped instead of CacheError
    return result


def test_every_flipped_byte_of_a_cache_is_damage_or_harmless(tmp_path):
    path = tmp_path / "c.h5"
    write_feature_cache(path, {"train": (features(40), np.arange(40) % 2), "val": (features(10, seed=1),
                                                                             np.arange(10) % 2)}, ["a", "b"])
    result = sweep(path, "cache", step=CACHE_STEP)
    assert len(result["detected"]) >= 0.3 * (path.stat().st_size // CACHE_STEP), len(result["detected"])


def test_every_flipped_byte_of_a_chunk_is_damage_or_harmless(tmp_path):
    store = fc.ChunkStore(tmp_path / "c.partial", "key", "float32")
    path = store.write([fc.digest(i) for i in range(8)], features(8))
    result = sweep(path, "chunk", config_key="key", dtype="float32")
    assert len(result["detected"]) >= 20  # the flips that hit its structure or its features


def test_a_damaged_chunk_is_discarded_and_its_rows_recomputed(tmp_path, capsys):
    store = fc.ChunkStore(tmp_path / "c.partial", "key", "float32")
    good = store.write([fc.digest(i) for i in range(8)], features(8))
    bad = store.write([fc.digest(i) for i in range(8, 16)], features(8, seed=1))
    import h5py

    with h5py.File(bad, "r") as f:
        offset = f["features"].id.get_chunk_info(0).byte_offset + 10  # inside its features
    data = bytearray(bad.read_bytes())
    data[offset] ^= 0xFF
    bad.write_bytes(bytes(data))
    rows, dim = store.rows()
    assert set(rows) == {fc.digest(i) for i in range(8)} and dim == 16
    assert good.exists() and not bad.exists() and f"discarding cannot read features of '{bad}'" in capsys.readouterr().out


def test_scan_index_checksum(tmp_path, capsys):
    path = tmp_path / "scan-x.h5"
    entries = {f"train/a/{i}.png": scan_index.ScanEntry((1, i, 3, 4, 5), fc.digest(i), "", "") for i in range(5)}
    scan_index.write_scan_index(path, entries)
    assert scan_index.read_scan_index(path) == entries
    sweep(path, "scan")
    # One hex character of one stored SHA-256 changed: the index is ignored, so every image is hashed again.
    raw = path.read_bytes()
    sha = entries["train/a/2.png"].sha256.encode()
    changed = sha[:10] + (b"0" if sha[10:11] != b"0" else b"1") + sha[11:]
    path.write_bytes(raw.replace(sha, changed))
    assert scan_index.read_scan_index(path) == {}
    assert f"the scan index '{path}' failed its checksum" in capsys.readouterr().out


def test_extract_and_head_rebuild_a_cache_damaged_anywhere(tmp_path, image_root):
    """The recipe of the issue: bytes flipped at offsets that made h5py raise KeyError/OSError/
    UnicodeDecodeError; each time the next stage discards the file and extracts again."""
    overrides = tiny_overrides(tmp_path, image_root) + ["run.num_threads=1"]
    status, entry = child.call(child.extract, overrides)
    assert status == "ok", entry
    path = tmp_path / "clean.h5"
    shutil.copyfile(entry["cache_file"], path)
    result = sweep(path, "cache", step=16 * STEP)  # only 4 damaging offsets are needed: a coarse sweep finds them
    picks = result["detected"][:: max(1, len(result["detected"]) // 4)][:4]
    for offset in picks:
        shutil.copyfile(path, entry["cache_file"])
        with open(entry["cache_file"], "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x5A]))
        status, again = child.call(child.extract, overrides)
        assert status == "ok", (offset, again)
        if again["cache_hit"]:  # the damage is in the features, which extract does not read back:
            status, again = child.call(child.head, overrides)  # the head stage finds and repairs it
            assert status == "ok", (offset, again)
        assert fc.is_intact(entry["cache_file"]), offset
