"""ImageFolder discovery, image loading and the per-model transform presets."""
from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from pipeline import PipelineError
from pipeline.imagefile import MAX_IMAGE_BYTES, ImageFileError, read_image_bytes  # noqa: F401 - re-exported

# torchvision.datasets.folder.IMG_EXTENSIONS (a test keeps them equal): importing torchvision costs about
# 1.5 s (it pulls in torch._dynamo), which a head run on cached features must not pay for a scan.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

DEMO_PREFIX = "demo:"
DEMO_DATASETS = ("flowers", "digits")
# 400 real photos of five flowers (CC BY 2.0, per-photo credits in its SOURCE.md), shipped in the package.
FLOWERS_DIR = Path(__file__).resolve().parent / "demo_data" / "flowers"
# Folders and files a camera, an OS or a notebook leaves behind; never classes, never images.
IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
# Bump when decode_image changes the pixels a file decodes to: it is part of the cache key.
DECODE_VERSION = 1
# macOS writes a "._<name>" AppleDouble file next to every file it copies to a foreign disk.
APPLEDOUBLE_PREFIX = "._"
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


@dataclass(frozen=True)
class Split:
    """One split's images: paths relative to the data root (POSIX), and their class indices."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class ImageFolderData:
    root: Path
    classes: tuple[str, ...]
    train: Split
    val: Split
    metadata_files: tuple[str, ...] = ()  # macOS ._* files with image extensions: listed, never read

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val}[name]


# ----------------------------------------------------------------------------- discovery
def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not _is_ignored(e.name))


def find_images(folder: Path) -> list[Path]:
    """Image files under folder, recursively, sorted; hidden and OS-made files and folders skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not _is_ignored(d))
        found += [Path(dirpath, f) for f in sorted(filenames) if not _is_ignored(f) and _is_image(f)]
    return found


def _inside(real: str, allowed: tuple[str, ...]) -> bool:
    return any(real == a or real.startswith(a.rstrip(os.sep) + os.sep) for a in allowed)


def _escape_error(root: Path, rel: str, real: str) -> PipelineError:
    return PipelineError(f"'{rel}' is a link to '{real}', outside data.root '{root}'; copy the files into "
                         "the data folder or remove the link")


def _check_file_link(root: Path, full: str, rel: str, allowed: tuple[str, ...]) -> None:
    """A symlinked image must resolve inside the data root; a link loop is an error."""
    try:
        os.stat(full)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PipelineError(f"symlink loop at '{rel}' in data.root '{root}': the link never reaches a "
                                "file; remove it") from None
        return  # a dangling link: the pre-scan lists it as unreadable
    real = os.path.realpath(full)
    if not _inside(real, allowed):
        raise _escape_error(root, rel, real)


def _walk_class(root: Path, cls_dir: Path, allowed: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Image files under one class folder (links followed, loops and escapes refused), and ._* files."""
    files, metadata = [], []
    seen: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(cls_dir, followlinks=True):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        real = os.path.realpath(dirpath)
        if not _inside(real, allowed):
            raise _escape_error(root, rel_dir, real)
        if real in seen:
            raise PipelineError(f"symlink loop in data.root '{root}': '{rel_dir}' leads back to "
                                f"'{seen[real]}'; remove the link")
        seen[real] = rel_dir
        dirnames[:] = sorted(d for d in dirnames if not _is_ignored(d))
        for name in sorted(filenames):
            if not _is_image(name):
                continue
            rel = f"{rel_dir}/{name}"
            if name.startswith(APPLEDOUBLE_PREFIX):
                metadata.append(rel)
            elif not _is_ignored(name):
                full = os.path.join(dirpath, name)
                if os.path.islink(full):
                    _check_file_link(root, full, rel, allowed)
                files.append(rel)
    return files, metadata


def _scan_split(root: Path, split: str, classes: list[str]) -> tuple[Split, list[str]]:
    paths, labels, metadata = [], [], []
    allowed = (os.path.realpath(root), os.path.realpath(root / split))
    for label, cls in enumerate(classes):
        cls_dir = root / split / cls
        files, meta = _walk_class(root, cls_dir, allowed)
        if not files:
            raise PipelineError(f"class folder '{cls_dir}' has no images "
                                f"(extensions: {', '.join(IMG_EXTENSIONS)}); add images or remove the folder")
        paths += files
        labels += [label] * len(files)
        metadata += meta
    return Split(tuple(paths), tuple(labels)), metadata


def discover_image_folder(root: str | Path) -> ImageFolderData:
    """Index root/train/<class>/* and root/val/<class>/*; classes and their order come from train."""
    root = Path(root)
    layout = f"(expected {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg)"
    if not root.is_dir():
        raise PipelineError(f"data.root '{root}' is not a folder {layout}")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise PipelineError(f"data.root '{root}' has no '{split}' folder {layout}")
    classes = _class_dirs(root / "train")
    if not classes:
        raise PipelineError(f"'{root / 'train'}' has no class folders {layout}")
    if len(classes) < 2:
        raise PipelineError(f"'{root / 'train'}' has 1 class folder ('{classes[0]}'): a classifier needs at "
                            f"least 2 classes {layout}")
    val_classes = _class_dirs(root / "val")
    missing = sorted(set(classes) - set(val_classes))
    extra = sorted(set(val_classes) - set(classes))
    if missing:
        raise PipelineError(f"class '{missing[0]}' is in '{root / 'train'}' but not in '{root / 'val'}' "
                            "(every class needs validation images)")
    if extra:
        raise PipelineError(f"class '{extra[0]}' is in '{root / 'val'}' but not in '{root / 'train'}' "
                            "(a head cannot predict a class it never saw)")
    train, train_meta = _scan_split(root, "train", classes)
    val, val_meta = _scan_split(root, "val", classes)
    return ImageFolderData(root, tuple(classes), train, val, tuple(train_meta + val_meta))


def resolve_in_root(root: Path, rel: str) -> Path:
    """root / rel for a POSIX path relative to the data root; absolute paths and '..' are refused."""
    parts = PurePosixPath(rel).parts
    if not rel or PurePosixPath(rel).is_absolute() or ".." in parts:
        raise PipelineError(f"image path '{rel}' escapes data.root '{root}' (paths must be relative to it, "
                            "without '..')")
    return Path(root, *parts)


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


def load_image_folder(root: str) -> ImageFolderData:
    return discover_image_folder(resolve_data_root(root))


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
