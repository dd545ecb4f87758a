import numpy as np
import pytest
from PIL import Image

from pipeline import PipelineError
from pipeline.data import (ImageListDataset, Preprocess, discover_image_folder, eval_transform, load_image,
                           resolve_data_root, write_digits_demo)
from tests.conftest import make_image_folder


def test_discover_orders_classes_from_train(tmp_path):
    root = make_image_folder(tmp_path, classes=("zebra", "ant", "bee"), n_train=2, n_val=1)
    data = discover_image_folder(root)
    assert data.classes == ("ant", "bee", "zebra")
    assert len(data.train) == 6 and len(data.val) == 3
    for path, label in zip(data.train.paths, data.train.labels):
        assert path.split("/")[1] == data.classes[label]


def test_hidden_and_system_files_are_ignored(tmp_path):
    root = make_image_folder(tmp_path, n_train=2, n_val=1)
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "__MACOSX").mkdir()
    (root / "train" / "ants" / ".DS_Store").write_bytes(b"x")
    (root / "train" / "ants" / "Thumbs.db").write_bytes(b"x")
    (root / "train" / "ants" / "._img_000.png").write_bytes(b"x")
    (root / "train" / "ants" / "notes.txt").write_text("x")
    data = discover_image_folder(root)
    assert data.classes == ("ants", "bees")
    assert sorted(data.train.paths) == ["train/ants/img_000.png", "train/ants/img_001.png",
                                        "train/bees/img_000.png", "train/bees/img_001.png"]


def test_class_missing_from_val_is_named(tmp_path):
    root = make_image_folder(tmp_path, n_train=2, n_val=1)
    (root / "train" / "wasps").mkdir()
    Image.new("RGB", (8, 8)).save(root / "train" / "wasps" / "w.png")
    with pytest.raises(PipelineError, match="class 'wasps' is in .* but not in"):
        discover_image_folder(root)


def test_class_only_in_val_is_named(tmp_path):
    root = make_image_folder(tmp_path, n_train=2, n_val=1)
    (root / "val" / "moths").mkdir()
    with pytest.raises(PipelineError, match="class 'moths' is in .*val"):
        discover_image_folder(root)


def test_empty_class_folder_is_an_error(tmp_path):
    root = make_image_folder(tmp_path, n_train=2, n_val=1)
    for f in (root / "val" / "bees").iterdir():
        f.unlink()
    with pytest.raises(PipelineError, match="bees' has no images"):
        discover_image_folder(root)


def test_missing_val_folder_explains_layout(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(PipelineError, match=r"has no val folder \(looked for val/, valid/, validation/; .*\): set data.val_dir"):
        discover_image_folder(tmp_path)


def test_missing_root(tmp_path):
    with pytest.raises(PipelineError, match="is not a folder"):
        discover_image_folder(tmp_path / "nope")


def test_unknown_demo():
    with pytest.raises(PipelineError, match="unknown demo dataset"):
        resolve_data_root("demo:cifar")


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "RGB", "1"])
def test_any_mode_loads_as_rgb(tmp_path, mode):
    img = Image.new("RGB", (10, 6), (200, 100, 50)).convert(mode)
    path = tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (10, 6)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.save(tmp_path / "p.png", transparency=0)
    assert load_image(tmp_path / "p.png").getpixel((0, 0)) == (255, 0, 0)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    px = [load_image(tmp_path / "g16.png").getpixel((i, 0))[0] for i in range(3)]
    assert px == [0, 128, 255]


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "o.jpg", exif=exif)
    assert load_image(tmp_path / "o.jpg").size == (10, 20)


def test_dataset_applies_transform(tmp_path):
    root = make_image_folder(tmp_path, n_train=1, n_val=1)
    data = discover_image_folder(root)
    pre = Preprocess(20, 16, (0.5,) * 3, (0.5,) * 3)
    x, y = ImageListDataset(root, data.train, eval_transform(pre))[1]
    assert x.shape == (3, 16, 16) and y == 1


def test_unreadable_image_names_file(tmp_path):
    root = make_image_folder(tmp_path, n_train=1, n_val=1)
    bad = root / "train" / "ants" / "img_000.png"
    bad.write_bytes(b"not a png")
    data = discover_image_folder(root)
    ds = ImageListDataset(root, data.train, eval_transform(Preprocess(20, 16, (0.5,) * 3, (0.5,) * 3)))
    with pytest.raises(PipelineError, match="img_000.png"):
        ds[0]


def test_digits_demo_is_a_stratified_image_folder(tmp_path):
    write_digits_demo(tmp_path / "digits")
    data = discover_image_folder(tmp_path / "digits")
    assert data.classes == tuple(str(d) for d in range(10))
    assert len(data.train) + len(data.val) == 1797
    assert len(data.val) == 450
    totals = np.bincount(data.train.labels) + np.bincount(data.val.labels)
    assert np.all(np.abs(np.bincount(data.val.labels) - 0.25 * totals) <= 1)  # stratified
    assert not set(p.split("/")[-1] for p in data.train.paths) & set(p.split("/")[-1] for p in data.val.paths)
    assert load_image(data.root / data.train.paths[0]).size == (8, 8)


def test_digits_demo_written_by_another_process_first_is_kept(tmp_path):
    """Ranks on several nodes sharing a disk may all write the demo; the first complete folder wins."""
    target = tmp_path / "digits"
    write_digits_demo(target)
    before = sorted(p.relative_to(target) for p in target.rglob("*.png"))
    marker = target / "train" / "0" / "kept.txt"
    marker.write_text("first writer")
    write_digits_demo(target)  # the rename onto the finished folder fails; this writer's copy is dropped
    assert marker.read_text() == "first writer"
    assert sorted(p.relative_to(target) for p in target.rglob("*.png")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]  # no temporary folder left behind


def test_flowers_demo_ships_its_photos_and_every_credit():
    from pipeline.data import FLOWERS_DIR, load_image_folder

    data = load_image_folder("demo:flowers")
    assert data.root == FLOWERS_DIR and data.classes == ("daisy", "dandelion", "roses", "sunflowers", "tulips")
    assert (len(data.train), len(data.val)) == (300, 100)
    assert np.all(np.bincount(data.val.labels) == 20)
    credits = (FLOWERS_DIR / "SOURCE.md").read_text(encoding="utf-8")
    assert "CC BY 2.0" in credits
    credited = {line.split(" | ")[0].lstrip("| ") for line in credits.splitlines() if line.startswith("| ")}
    missing = [p for p in data.train.paths + data.val.paths if p not in credited]
    assert not missing  # CC BY 2.0: each photo's author and source travel with it


def test_image_reading_refuses_what_is_not_a_regular_file_before_reading(tmp_path):
    """A fifo would block forever and /dev/zero never ends: both are refused from fstat, unread."""
    import os
    import time

    from pipeline.data import ImageFileError, load_image, read_image_bytes

    os.mkfifo(tmp_path / "f.jpg")
    (tmp_path / "z.jpg").symlink_to("/dev/zero")
    t0 = time.monotonic()
    for path in (tmp_path / "f.jpg", tmp_path / "z.jpg", tmp_path):
        with pytest.raises(ImageFileError, match="not a regular file"):
            load_image(path)
    assert time.monotonic() - t0 < 5
    (tmp_path / "big.png").write_bytes(b"\x89PNG" + b"\0" * 2000)
    with pytest.raises(ImageFileError, match="more than an image file may be"):
        read_image_bytes(tmp_path / "big.png", max_bytes=1000)
    assert read_image_bytes(tmp_path / "big.png").startswith(b"\x89PNG")


def test_a_non_image_is_named_not_pillows_buffer(tmp_path):
    from PIL import UnidentifiedImageError

    from pipeline.data import decode_image

    with pytest.raises(UnidentifiedImageError) as e:
        decode_image(b"hello, not an image")
    assert "BytesIO" not in str(e.value) and "not an image format" in str(e.value)


def test_one_class_only_is_an_error_naming_the_class_count(tmp_path):
    root = make_image_folder(tmp_path / "one", classes=("ants",), n_train=2, n_val=1)
    with pytest.raises(PipelineError, match=r"has 1 class folder \('ants'\): a classifier needs at least 2"):
        discover_image_folder(root)
