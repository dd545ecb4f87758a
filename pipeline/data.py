"""Image loading, the per-model transform presets and the demo datasets (discovery: pipeline.folders)."""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import tempfile
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from pipeline import PipelineError
from pipeline.folders import (APPLEDOUBLE_PREFIX, IGNORED_NAMES, IMG_EXTENSIONS, ImageFolderData,  # noqa: F401
                              Split, discover_image_folder, find_images, resolve_in_root)    # re-exported
from pipeline.imagefile import MAX_IMAGE_BYTES, ImageFileError, read_image_bytes  # noqa: F401 - re-exported

DEMO_PREFIX = "demo:"
DEMO_DATASETS = ("flowers", "digits")
# 400 real photos of five flowers (CC BY 2.0, per-photo credits in its SOURCE.md), shipped in the package.
FLOWERS_DIR = Path(__file__).resolve().parent / "demo_data" / "flowers"
# Bump when decode_image changes the pixels a file decodes to: it is part of the cache key.
DECODE_VERSION = 1
# First bytes of the formats in IMG_EXTENSIONS: tells a damaged image from a file that never was one.
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"RIFF",
                    b"GIF8", b"P1", b"P2", b"P3", b"P4", b"P5", b"P6", b"P7")


@dataclass(frozen=True)
class Preprocess:
    """Everything that turns an image file into the backbone's input tensor."""

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return {"resize_size": self.resize_size, "crop_size": self.crop_size, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(int(d["resize_size"]), int(d["crop_size"]), tuple(d["mean"]), tuple(d["std"]),
                   str(d["interpolation"]))


def demo_dir() -> Path:
    """The repo's data folder where demo datasets are written (ignored by git)."""
    return Path(__file__).resolve().parent.parent / "data"


def write_digits_demo(target: Path, val_fraction: float = 0.25, seed: int = 0) -> None:
    """Write scikit-learn's 1,797 handwritten digits as an ImageFolder of 8x8 grayscale PNGs.

    The split is stratified and seeded with a fixed seed so the folder never depends on run.seed.
    Written into a temporary folder and renamed, so an interrupted write leaves nothing half-done.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8), values 0..16
    idx = np.arange(len(pixels))
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, stratify=digits.target,
                                          random_state=seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for split, ids in (("train", train_idx), ("val", val_idx)):
            for i in sorted(ids):
                folder = tmp / split / str(digits.target[i])
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels[i], mode="L").save(folder / f"digit_{i:04d}.png")
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process wrote the same (seeded) folder first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_data_root(root: str) -> Path:
    """data.root as a folder: 'demo:flowers' is shipped in the package; 'demo:digits' is materialised once
    under the repo's data/ folder."""
    if not root.startswith(DEMO_PREFIX):
        return Path(root).expanduser()
    name = root[len(DEMO_PREFIX):]
    if name not in DEMO_DATASETS:
        raise PipelineError(f"data.root '{root}': unknown demo dataset (available: "
                            f"{', '.join(DEMO_PREFIX + d for d in DEMO_DATASETS)})")
    if name == "flowers":
        if not (FLOWERS_DIR / "train").is_dir():
            raise PipelineError(f"data.root '{root}': the demo photos are missing from {FLOWERS_DIR} "
                                "(reinstall the package, or use demo:digits)")
        return FLOWERS_DIR
    target = demo_dir() / name
    if not target.exists():
        print(f"writing the '{name}' demo dataset to {target} (once)")
        write_digits_demo(target)
    return target


def load_image_folder(root: str, val_dir: Optional[str] = None, split_train: bool = False) -> ImageFolderData:
    """data.root's ImageFolder (see folders.discover_image_folder for val_dir and split_train)."""
    return discover_image_folder(resolve_data_root(root), val_dir, split_train)


def load_dataset(cfg_data) -> ImageFolderData:
    """data.* (a config.DataConfig) as an ImageFolderData split exactly as extract splits it: the val
    folder and test/, or with data.val_fraction val (and test) carved off train by content hash.

    For stages that read the images themselves (finetune): the files are hashed here; extract uses its
    pre-scan's hashes instead, with the same result for every readable image.
    """
    from pipeline.splits import carve_train, check_split_settings, hash_file

    data = load_image_folder(cfg_data.root, cfg_data.val_dir, cfg_data.val_fraction is not None)
    check_split_settings(data.root, cfg_data.val_fraction, cfg_data.test_fraction, data.test is not None)
    if cfg_data.val_fraction is None:
        return data
    try:
        digests = [hash_file(resolve_in_root(data.root, p)) for p in data.train.paths]
    except OSError as e:
        raise PipelineError(f"cannot read image '{e.filename}': {e.strerror}") from None
    plan = carve_train(digests, data.train.labels, data.classes, cfg_data.val_fraction, cfg_data.test_fraction,
                       cfg_data.split_seed)
    part = {s: Split(tuple(data.train.paths[i] for i in plan.indices(s)),
                     tuple(data.train.labels[i] for i in plan.indices(s))) for s in ("train", "val", "test")}
    return dataclasses.replace(data, train=part["train"], val=part["val"],
                               test=part["test"] if cfg_data.test_fraction else data.test)


# ----------------------------------------------------------------------------- images
def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float images to 8-bit instead of clipping them."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
        arr = arr.astype(np.float64) * (255.0 / 65535.0)
    elif img.mode == "F":
        arr = arr.astype(np.float64) * (255.0 if arr.max(initial=0) <= 1.0 else 1.0)
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes as RGB whatever the mode (L, LA, P, RGBA, CMYK, 16-bit), EXIF orientation applied.

    Decodes every pixel, so a truncated or damaged file raises here rather than halfway through a run.
    Images above Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) raise DecompressionBombError.
    """
    try:
        opened = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # Pillow's message names its BytesIO object, not the file
        raise UnidentifiedImageError("not an image format Pillow can read") from None
    with opened as img:
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and img.width * img.height > limit:
            raise Image.DecompressionBombError(f"{img.width}x{img.height} = {img.width * img.height} pixels "
                                               f"exceeds Pillow's limit of {limit} (Image.MAX_IMAGE_PIXELS)")
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "F") or img.mode.startswith("I;16"):
            img = _to_8bit(img)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB (see decode_image and read_image_bytes)."""
    return decode_image(read_image_bytes(path))


def image_problem(data: bytes) -> Optional[tuple[str, str]]:
    """None if data decodes as an image, else (reason code, detail) for the bad-files report.

    Codes: empty, not_an_image, truncated, corrupt, decompression_bomb.
    """
    if not data:
        return "empty", "empty file (0 bytes)"
    try:
        decode_image(data)
    except Image.DecompressionBombError as e:
        return "decompression_bomb", f"decompression bomb: {e}"
    except UnidentifiedImageError:
        if data.startswith(IMAGE_SIGNATURES):
            return "corrupt", "starts like an image but Pillow cannot identify it (damaged header)"
        return "not_an_image", "not an image: no image signature and Pillow cannot identify it"
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, struct.error...
        detail = f"{type(e).__name__}: {e}"
        return ("truncated" if "truncated" in str(e).lower() else "corrupt"), detail
    return None


def ignore_sigint(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: leave Ctrl-C to the main process, which stops cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    return {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
            "bicubic": InterpolationMode.BICUBIC}[name]


def eval_transform(pre: Preprocess):
    """Resize, center-crop, normalise: what the backbone saw on ImageNet validation."""
    from torchvision import transforms as T

    interp = _interpolation(pre.interpolation)
    return T.Compose([T.Resize(pre.resize_size, interpolation=interp, antialias=True),
                      T.CenterCrop(pre.crop_size), T.ToTensor(), T.Normalize(pre.mean, pre.std)])


def train_transform(pre: Preprocess):
    """The tutorial's train-time augmentation: RandomResizedCrop + horizontal flip."""
    from torchvision import transforms as T

    interp = _interpolation(pre.interpolation)
    return T.Compose([T.RandomResizedCrop(pre.crop_size, interpolation=interp, antialias=True),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(pre.mean, pre.std)])


class ImageListDataset(Dataset):
    """(image tensor, label) for a list of paths relative to root.

    sha256: when given, each file's bytes must still hash to sha256[i], so the tensor is exactly the
    content the cache key was computed from (a file edited mid-run is an error, not a stale row).
    """

    def __init__(self, root: Path, split: Split, transform, sha256: Optional[Sequence[str]] = None) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.sha256 = sha256

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = resolve_in_root(self.root, self.split.paths[i])
        try:
            data = read_image_bytes(path)
        except OSError as e:
            raise PipelineError(f"cannot read image '{path}': {e.strerror}") from None
        if self.sha256 is not None and hashlib.sha256(data).hexdigest() != self.sha256[i]:
            raise PipelineError(f"image '{path}' changed during extraction (its bytes no longer match the "
                                "pre-scan); run the extract stage again")
        try:
            img = decode_image(data)
        except Exception as e:  # noqa: BLE001 - see image_problem
            raise PipelineError(f"cannot read image '{path}': {e}") from None
        return self.transform(img), self.split.labels[i]
