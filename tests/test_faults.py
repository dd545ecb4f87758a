"""Fault injection: bad images, bad trees, bad params, bad disks and tampered caches.

Each case asserts its exact outcome (skipped with a reason, a clear error, or a correct
conversion) and that nothing valid was lost or misaligned.
"""
import errno
import io
import json
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.extract as ex
import run_pipeline
from pipeline import PipelineError
from pipeline import cache as fc
from pipeline.config import ConfigError, load_config
from pipeline.data import decode_image, discover_image_folder, resolve_in_root
from pipeline.scan import BAD_FILES, TooManyBadFiles
from tests import child
from tests.conftest import assert_aligned, assert_features_are_the_images, make_image_folder, tiny_overrides

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- bad files
def noise_bytes(fmt: str, size: int = 64, mode: str = "RGB") -> bytes:
    arr = (np.random.default_rng(7).random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, fmt)
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png() -> bytes:
    """A 300-byte PNG whose header claims 30000 x 30000 pixels (Pillow refuses it on open)."""
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))


def corrupt_png_data() -> bytes:
    data = bytearray(noise_bytes("PNG"))
    start = data.index(b"IDAT") + 40
    data[start:start + 60] = b"\x13" * 60
    return bytes(data)


def corrupt_jpeg_header() -> bytes:
    data = bytearray(noise_bytes("JPEG"))
    data[100:200] = bytes(np.random.default_rng(1).integers(0, 256, 100, dtype=np.uint8))
    return bytes(data)


# file name under train/ants -> (bytes, reason code in bad_files.json)
BAD_FILES_WRITTEN = {
    "truncated.jpg": (lambda: noise_bytes("JPEG")[:1500], "truncated"),
    "truncated.png": (lambda: noise_bytes("PNG")[:6000], "truncated"),
    "corrupt_header.jpg": (corrupt_jpeg_header, "corrupt"),
    "corrupt_data.png": (corrupt_png_data, "corrupt"),
    "empty.png": (lambda: b"", "empty"),
    "notes.jpg": (lambda: b"these are my notes, not a photo\n", "not_an_image"),
    "bomb.png": (bomb_png, "decompression_bomb"),
}


def write_mode_images(folder: Path) -> None:
    """One image per awkward mode, each with a known RGB result."""
    Image.new("RGB", (8, 8), (200, 100, 50)).convert("CMYK").save(folder / "cmyk.jpg", quality=100)
    Image.new("L", (8, 8), 77).save(folder / "gray.png")
    Image.new("LA", (8, 8), (77, 128)).save(folder / "gray_alpha.png")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(folder / "palette.png", transparency=0)
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(folder / "rgba.png")
    Image.fromarray(np.array([[0, 32768, 65535]] * 3, dtype=np.uint16)).save(folder / "gray16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    Image.new("RGB", (20, 10), (10, 20, 30)).save(folder / "rotated.jpg", exif=exif)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """One extraction over a folder holding every kind of bad, ignored and awkward file."""
    tmp = tmp_path_factory.mktemp("messy")
    root = make_image_folder(tmp / "imgs")
    ants = root / "train" / "ants"
    for name, (make, _) in BAD_FILES_WRITTEN.items():
        (ants / name).write_bytes(make())
    os.symlink("no_such_file.png", ants / "dangling.png")
    os.mkfifo(ants / "pipe.png")  # reading it would block forever
    with open(os.fsencode(ants) + b"/caf\xe9.png", "wb") as f:  # a Latin-1 name from an old archive
        f.write(noise_bytes("PNG"))
    (ants / "._img_000.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (ants / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (ants / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    for hidden in (root / "train" / ".ipynb_checkpoints", root / "train" / "__MACOSX", ants / ".cache"):
        hidden.mkdir()
        Image.new("RGB", (8, 8)).save(hidden / "x.png")
    write_mode_images(ants)
    cfg = load_config(None, tiny_overrides(tmp, root) + ["data.max_bad_fraction=0.5"])
    plan, entry = ex.ensure_cache(ex.ExtractJob.of(cfg), CPU)
    cache = fc.read_cache(plan.path, plan.key)
    report = json.loads((cfg.run_dir / BAD_FILES).read_text())
    return {"root": root, "cfg": cfg, "plan": plan, "entry": entry, "cache": cache, "report": report}


OTHER_BAD = {"dangling.png": "broken_symlink", "pipe.png": "unreadable", "caf\udce9.png": "bad_name"}


@pytest.mark.parametrize("name", sorted(BAD_FILES_WRITTEN) + sorted(OTHER_BAD))
def test_bad_file_is_skipped_with_its_reason(messy, name):
    reasons = {f["path"]: f["reason"] for f in messy["report"]["files"]}
    expected = OTHER_BAD.get(name) or BAD_FILES_WRITTEN[name][1]
    assert reasons[f"train/ants/{name}"] == expected
    assert f"train/ants/{name}" not in messy["cache"].train.paths
    assert_aligned(messy["cache"], messy["root"])


def test_bad_files_are_counted_in_metrics_and_report(messy):
    n_bad = len(BAD_FILES_WRITTEN) + len(OTHER_BAD)
    assert messy["entry"]["bad_files"] == n_bad == messy["report"]["bad"]
    assert messy["entry"]["bad_files_report"] == str(messy["cfg"].run_dir / BAD_FILES)
    assert all(f["detail"] for f in messy["report"]["files"])


def test_appledouble_is_listed_but_not_counted_as_bad(messy):
    assert messy["report"]["metadata_files"] == [
        {"path": "train/ants/._img_000.png", "reason": "appledouble",
         "detail": "macOS AppleDouble metadata file (._*), not an image"}]
    assert "train/ants/._img_000.png" not in {f["path"] for f in messy["report"]["files"]}


def test_system_and_hidden_files_are_ignored_and_never_classes(messy):
    cache, report = messy["cache"], messy["report"]
    listed = {f["path"] for f in report["files"]} | {f["path"] for f in report["metadata_files"]}
    every_row = cache.train.paths + cache.val.paths
    for name in (".DS_Store", "Thumbs.db", ".ipynb_checkpoints", "__MACOSX", ".cache"):
        assert not any(name in p for p in every_row + sorted(listed)), name
    assert cache.classes == ("ants", "bees")


def test_every_valid_image_kept_and_aligned(messy):
    cache, root = messy["cache"], messy["root"]
    good_train = {f"train/{c}/img_{i:03d}.png" for c in ("ants", "bees") for i in range(6)}
    modes = {f"train/ants/{n}" for n in ("cmyk.jpg", "gray.png", "gray_alpha.png", "palette.png", "rgba.png",
                                         "gray16.png", "rotated.jpg")}
    assert set(cache.train.paths) == good_train | modes
    assert len(cache.val.paths) == 6
    assert_aligned(cache, root)
    assert_features_are_the_images(cache, messy["cfg"], messy["plan"])


@pytest.mark.parametrize("name, check", [
    ("cmyk.jpg", lambda im: im.getpixel((4, 4)) == (200, 100, 50)),
    ("gray.png", lambda im: im.getpixel((0, 0)) == (77, 77, 77)),
    ("gray_alpha.png", lambda im: im.getpixel((0, 0)) == (77, 77, 77)),
    ("palette.png", lambda im: im.getpixel((0, 0)) == (255, 0, 0)),
    ("rgba.png", lambda im: im.getpixel((0, 0)) == (10, 20, 30)),
    ("gray16.png", lambda im: [im.getpixel((i, 0)) for i in range(3)] == [(0, 0, 0), (128, 128, 128),
                                                                           (255, 255, 255)]),
    ("rotated.jpg", lambda im: im.size == (10, 20)),
], ids=["cmyk", "grayscale", "grayscale-alpha", "palette-transparency", "rgba", "16-bit", "exif-rotation"])
def test_awkward_modes_convert_to_rgb_and_are_extracted(messy, name, check):
    path = f"train/ants/{name}"
    img = decode_image((messy["root"] / path).read_bytes())
    assert img.mode == "RGB" and check(img)
    i = messy["cache"].train.paths.index(path)
    assert messy["cache"].classes[messy["cache"].train.labels[i]] == "ants"


def test_too_many_bad_files_abort_before_anything_is_written(tiny_cfg, image_root):
    for i in range(3):  # 3 of 21 > 10%
        (image_root / "val" / "bees" / f"broken_{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    cfg = tiny_cfg("data.max_bad_fraction=0.1")
    with pytest.raises(TooManyBadFiles) as err:
        ex.run_extract(cfg, CPU)
    report = cfg.run_dir / BAD_FILES
    assert str(err.value).startswith(f"3 of 21 image files in data.root '{image_root}' (14.3%) are unreadable, "
                                      "more than data.max_bad_fraction=0.1; nothing was extracted")
    assert str(report) in str(err.value)
    assert [f["path"] for f in json.loads(report.read_text())["files"]] == [
        f"val/bees/broken_{i}.png" for i in range(3)]
    cache_dir = Path(cfg.extract.cache_dir)
    assert not cache_dir.exists() or not list(cache_dir.glob("*resnet18-*"))


def test_skipped_image_is_never_replaced_by_another(tiny_cfg, image_root, tmp_path):
    clean = fc.read_cache(ex.run_extract(tiny_cfg(f"extract.cache_dir={tmp_path / 'clean'}"), CPU)["cache_file"])
    (image_root / "train" / "ants" / "img_002_bad.png").write_bytes(b"")  # sorts between img_002 and img_003
    entry = ex.run_extract(tiny_cfg("data.max_bad_fraction=0.1"), CPU)
    cache = fc.read_cache(entry["cache_file"])
    assert cache.train.paths == clean.train.paths and cache.val.paths == clean.val.paths
    assert np.array_equal(cache.train.features, clean.train.features)  # bitwise: same rows, same batches
    assert np.array_equal(cache.train.labels, clean.train.labels)
    assert entry["bad_files"] == 1


def test_class_with_only_bad_images_is_an_error(tiny_cfg, image_root):
    for f in (image_root / "val" / "bees").iterdir():
        f.write_bytes(b"")
    cfg = tiny_cfg("data.max_bad_fraction=0.5")
    with pytest.raises(PipelineError, match=r"class 'bees' has no readable images in .*val/bees.*bad_files\.json"):
        ex.run_extract(cfg, CPU)


def test_image_edited_during_extraction_is_an_error(tiny_cfg, image_root, monkeypatch):
    victim = image_root / "train" / "bees" / "img_001.png"
    real_extract = ex.extract_chunks

    def edit_then_extract(*args, **kwargs):
        Image.new("RGB", (24, 24), (1, 2, 3)).save(victim)
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(ex, "extract_chunks", edit_then_extract)
    with pytest.raises(PipelineError, match="img_001.png' changed during extraction"):
        ex.run_extract(tiny_cfg(), CPU)


# ----------------------------------------------------------------------------- bad trees
def test_empty_class_folder_is_an_error(tmp_path):
    root = make_image_folder(tmp_path, n_train=2, n_val=1)
    (root / "train" / "wasps").mkdir()
    (root / "val" / "wasps").mkdir()
    with pytest.raises(PipelineError, match="class folder '.*train/wasps' has no images"):
        discover_image_folder(root)


def test_class_only_in_train_is_an_error(tmp_path):
    root = make_image_folder(tmp_path, n_train=2, n_val=1)
    (root / "train" / "wasps").mkdir()
    Image.new("RGB", (8, 8)).save(root / "train" / "wasps" / "w.png")
    with pytest.raises(PipelineError, match="class 'wasps' is in '.*train' but not in '.*val'"):
        discover_image_folder(root)


def test_class_only_in_val_is_an_error(tmp_path):
    root = make_image_folder(tmp_path, n_train=2, n_val=1)
    (root / "val" / "moths").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "moths" / "m.png")
    with pytest.raises(PipelineError, match="class 'moths' is in '.*val' but not in '.*train'"):
        discover_image_folder(root)


def test_symlinked_folder_loop_is_an_error(tmp_path):
    root = make_image_folder(tmp_path, n_train=2, n_val=1)
    os.symlink("..", root / "train" / "ants" / "again")
    with pytest.raises(PipelineError, match="symlink loop in data.root .*'train/ants/again/ants' leads back to "
                                            "'train/ants'"):
        discover_image_folder(root)


def test_symlinked_file_loop_is_an_error(tmp_path):
    root = make_image_folder(tmp_path, n_train=2, n_val=1)
    os.symlink("b.png", root / "train" / "ants" / "a.png")
    os.symlink("a.png", root / "train" / "ants" / "b.png")
    with pytest.raises(PipelineError, match="symlink loop at 'train/ants/a.png'"):
        discover_image_folder(root)


def test_link_escaping_the_data_root_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=2, n_val=1)
    outside = tmp_path / "private.png"
    Image.new("RGB", (8, 8)).save(outside)
    os.symlink(outside, root / "train" / "ants" / "leak.png")
    with pytest.raises(PipelineError, match=f"'train/ants/leak.png' is a link to '{outside}', outside data.root"):
        discover_image_folder(root)


def test_linked_split_folder_is_allowed(tmp_path):
    """data/train -> elsewhere is a common layout: links inside it may point anywhere within it."""
    real = make_image_folder(tmp_path / "big_disk", n_train=2, n_val=1)
    root = tmp_path / "data"
    root.mkdir()
    os.symlink(real / "train", root / "train")
    os.symlink(real / "val", root / "val")
    assert len(discover_image_folder(root).train) == 4


@pytest.mark.parametrize("rel", ["../outside.png", "/etc/passwd", "train/../../x.png", ""],
                         ids=["parent", "absolute", "inner-parent", "empty"])
def test_paths_escaping_the_root_are_refused(tmp_path, rel):
    with pytest.raises(PipelineError, match="escapes data.root"):
        resolve_in_root(tmp_path, rel)


# ----------------------------------------------------------------------------- bad params
@pytest.mark.parametrize("text, message", [
    ('{"extract": {"chunk_sise": 8}}', "unknown key 'extract.chunk_sise'"),
    ('{"data": {"max_bad_fraction": "5%"}}', "data.max_bad_fraction: expected a number"),
    ('{"extract": {"lock_timeout": NaN}}', "NaN is not allowed"),
    ('{"data": {"max_bad_fraction": Infinity}}', "Infinity is not allowed"),
    ('{"extract": {"verify": "stat", "verify": "content"}}', "duplicate key 'verify'"),
    ('{"extract": {"chunk_size": -8}}', "extract.chunk_size: must be > 0"),
    ('{"extract": {"batch_size": 0}}', "extract.batch_size: must be > 0"),
    ('{"backbone": {"image_size": -32}}', "backbone.image_size: must be > 0"),
    ('{"data": {"max_bad_fraction": 1.5}}', "data.max_bad_fraction: must be <= 1"),
    ('{"extract": {"verify": "mtime"}}', "extract.verify: 'mtime' is not one of stat, content"),
    ('{\n "extract": {\n  "chunk_size": 8,,\n }\n}', "invalid JSON at line 3"),
    ('{"run": {"name": "caf\xe9"}}', "not UTF-8 text \\(byte 21\\)"),
], ids=["unknown-key", "wrong-type", "nan", "infinity", "duplicate-key", "negative-chunk-size", "zero-batch-size",
        "negative-image-size", "fraction-above-1", "unknown-choice", "syntax-error", "not-utf8"])
def test_bad_params_name_the_key_and_write_nothing(tmp_path, text, message):
    params = tmp_path / "params.json"
    params.write_text(text, encoding="latin-1")
    with pytest.raises(ConfigError, match=message):
        load_config(params)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert run_pipeline.main(["--params", str(params), "extract"]) == 2
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.json"]  # no runs/, no cache/


# ----------------------------------------------------------------------------- bad disks
def cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".lock")
                  and not p.name.startswith("scan-")) if folder.exists() else []


def test_disk_full_while_saving_a_chunk_keeps_the_previous_cache(tiny_cfg, image_root, monkeypatch):
    cfg = tiny_cfg()
    before = fc.read_cache(ex.run_extract(cfg, CPU)["cache_file"])
    Image.new("RGB", (24, 24), (5, 5, 5)).save(image_root / "train" / "ants" / "new.png")

    def no_space(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("pipeline.fsutil.fsync_file", no_space)
    with pytest.raises(fc.CacheError, match=r"cannot write to cache folder '.*': No space left on device\. .*"
                                            r"previous cache is untouched"):
        ex.run_extract(cfg, CPU)
    after = fc.read_cache(before.path)
    assert after.attrs["key"] == before.attrs["key"]
    assert np.array_equal(after.train.features, before.train.features)
    assert cache_files(before.path.parent) == [before.path.name]  # no temp or chunk files left


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1.2 MB tmpfs: room for the small first cache, not for a second copy (needs mount rights)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); the injected ENOSPC case covers the logic")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.parametrize("room", [0, 24 * 1024], ids=["chunk", "assembly"])
def test_real_disk_full_keeps_the_previous_cache(tmp_path, image_root, tiny_disk, room):
    """room: bytes left free, none (the chunk write fails) or a chunk's worth (writing the full file fails)."""
    overrides = tiny_overrides(tmp_path, image_root) + [f"extract.cache_dir={tiny_disk}", "extract.chunk_size=4",
                                                        "extract.verify=content"]  # no scan index to write
    first = ex.run_extract(load_config(None, overrides), CPU)
    before = fc.read_cache(first["cache_file"])
    ballast = tiny_disk / "ballast"
    ballast.write_bytes(b"\0" * (os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize - room))
    Image.new("RGB", (24, 24), (5, 5, 5)).save(image_root / "train" / "ants" / "new.png")
    # In a child: after a failed write the HDF5 library may keep state this process should not share.
    status, (kind, message, _) = child.call(child.extract, overrides)
    assert status == "error" and kind == "CacheError"
    assert message.startswith(f"cannot write to cache folder '{tiny_disk}': No space left on device. ")
    assert fc.read_cache(first["cache_file"]).attrs["key"] == before.attrs["key"]
    assert not [n for n in cache_files(tiny_disk) if n.endswith(".tmp")]
    ballast.unlink()
    entry = ex.run_extract(load_config(None, overrides), CPU)  # with space again it finishes
    assert entry["rows_extracted"] == (1 if room == 0 else 0)  # the chunk saved before the disk filled is kept
    assert len(fc.read_cache(entry["cache_file"]).train.paths) == 13


def test_read_only_cache_folder(tiny_cfg, image_root, read_only):
    cfg = tiny_cfg()
    before = fc.read_cache(ex.run_extract(cfg, CPU)["cache_file"])
    read_only(before.path.parent)
    assert ex.run_extract(cfg, CPU)["cache_hit"] is True  # reading needs no write access
    Image.new("RGB", (24, 24), (5, 5, 5)).save(image_root / "train" / "ants" / "new.png")
    with pytest.raises(fc.CacheError, match="cannot write to cache folder .*(Permission denied|not permitted)"):
        ex.run_extract(cfg, CPU)
    assert np.array_equal(fc.read_cache(before.path).train.features, before.train.features)
    assert not [n for n in cache_files(before.path.parent) if n.endswith(".tmp")]


# ----------------------------------------------------------------------------- tampered caches
def tamper(path: Path, edit) -> None:
    with h5py.File(path, "a") as f:
        edit(f)


def test_reordered_rows_are_never_reused(tiny_cfg):
    cfg = tiny_cfg()
    entry = ex.run_extract(cfg, CPU)
    path = Path(entry["cache_file"])

    def swap_two_paths(f):
        paths = f["train/paths"][()]
        paths[[0, 1]] = paths[[1, 0]]
        f["train/paths"][...] = paths

    tamper(path, swap_two_paths)
    with pytest.raises(fc.CacheError, match="do not match the recorded manifest digest"):
        fc.read_cache(path)
    again = ex.run_extract(cfg, CPU)
    assert again["cache_hit"] is False and again["miss_reason"].startswith("cache file failed verification")
    assert again["rows_extracted"] == 18  # nothing taken from the tampered file
    assert_aligned(fc.read_cache(path), Path(cfg.data.root))


def test_wrong_dataset_dtype_is_refused_before_reading(tiny_cfg):
    path = Path(ex.run_extract(tiny_cfg(), CPU)["cache_file"])

    def features_as_ints(f):
        n = f["val/features"].shape
        del f["val/features"]
        f.create_dataset("val/features", data=np.zeros(n, dtype=np.int32))

    tamper(path, features_as_ints)
    with pytest.raises(fc.CacheError, match=r"'val/features' has shape \(6, 512\) dtype int32, expected"):
        fc.read_cache(path)


def test_flipped_feature_bits_fail_the_checksum_and_get_rebuilt(tiny_cfg):
    cfg = tiny_cfg()
    path = Path(ex.run_extract(cfg, CPU)["cache_file"])
    clean = fc.read_cache(path)
    with h5py.File(path, "r") as f:
        offset = f["train/features"].id.get_offset() if f["train/features"].chunks is None else \
            f["train/features"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + 100)
        byte = fh.read(1)
        fh.seek(offset + 100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(fc.CacheError, match="cannot read cache"):
        fc.read_cache(path)
    features, _ = ex.load_features(ex.ExtractJob.of(cfg), CPU)  # never reused: detected, discarded, extracted again
    assert np.array_equal(features.train.features, clean.train.features)


def test_leftover_temp_files_are_never_read_and_get_removed(tiny_cfg):
    cfg = tiny_cfg()
    path = Path(ex.run_extract(cfg, CPU)["cache_file"])
    stale = path.with_name(f".{path.name}.999999.tmp")
    shutil.copy(path, stale)
    partial = fc.partial_dir(path)
    partial.mkdir()
    (partial / ".chunk-0123.999999.tmp").write_bytes(b"half a chunk")
    Image.new("RGB", (24, 24), (5, 5, 5)).save(Path(cfg.data.root) / "val" / "ants" / "new.png")
    entry = ex.run_extract(cfg, CPU)
    assert entry["rows_extracted"] == 1
    assert not stale.exists() and not partial.exists()


def test_cache_dir_that_is_a_file_says_so_not_free_disk_space(tiny_cfg, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(PipelineError, match="'.*afile' is a file, not a folder; move it away or set extract.cache_dir"):
        ex.run_extract(tiny_cfg(f"extract.cache_dir={tmp_path / 'afile'}"), CPU)
