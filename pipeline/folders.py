"""ImageFolder discovery: which files are the images of which class, in which split (stdlib only).

A dataset is root/train/<class>/* plus
- a val folder: root/val, root/valid or root/validation, or the one named by data.val_dir;
  or none at all when data.val_fraction splits train (pipeline.scan.split_scan, after hashing);
- optionally root/test/<class>/* with the same classes: scored once, after selection on val.
Classes and their order come from train/. Re-exported by pipeline.data.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

from pipeline import PipelineError
from pipeline.splits import SplitError, resolve_val_dir

# torchvision.datasets.folder.IMG_EXTENSIONS (tests/test_data.py keeps the two equal), without importing it.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Folders and files a camera, an OS or a notebook leaves behind; never classes, never images.
IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
# macOS writes a "._<name>" AppleDouble file next to every file it copies to a foreign disk.
APPLEDOUBLE_PREFIX = "._"
TEST_DIR = "test"


@dataclass(frozen=True)
class Split:
    """One split's images: paths relative to the data root (POSIX), and their class indices."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)


EMPTY = Split((), ())


@dataclass(frozen=True)
class ImageFolderData:
    root: Path
    classes: tuple[str, ...]
    train: Split
    val: Split
    metadata_files: tuple[str, ...] = ()  # macOS ._* files with image extensions: listed, never read
    test: Optional[Split] = None          # root/test, or carved from train by data.test_fraction
    val_dir: str = "val"                  # the val folder's name; "" when val is carved from train

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits this dataset has: train, val and, when present, test."""
        return ("train", "val") + (("test",) if self.test is not None else ())

    def split(self, name: str) -> Split:
        found = {"train": self.train, "val": self.val, "test": self.test}.get(name)
        if found is None:
            raise PipelineError(f"data.root '{self.root}' has no '{name}' split (it has {', '.join(self.splits)})")
        return found


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


def _check_same_classes(root: Path, classes: list[str], folder: str, why: str) -> None:
    """folder/ must hold exactly train/'s classes: one line naming the first difference."""
    found = _class_dirs(root / folder)
    missing = sorted(set(classes) - set(found))
    extra = sorted(set(found) - set(classes))
    if missing:
        raise PipelineError(f"class '{missing[0]}' is in '{root / 'train'}' but not in '{root / folder}' ({why})")
    if extra:
        raise PipelineError(f"class '{extra[0]}' is in '{root / folder}' but not in '{root / 'train'}' "
                            "(a head cannot predict a class it never saw)")


def _check_root(root: Path, layout: str) -> None:
    if not root.is_dir():
        raise PipelineError(f"data.root '{root}' is not a folder {layout}")
    if not (root / "train").is_dir():
        raise PipelineError(f"data.root '{root}' has no 'train' folder {layout}")


def _train_classes(root: Path, layout: str) -> list[str]:
    classes = _class_dirs(root / "train")
    if not classes:
        raise PipelineError(f"'{root / 'train'}' has no class folders {layout}")
    if len(classes) < 2:
        raise PipelineError(f"'{root / 'train'}' has 1 class folder ('{classes[0]}'): a classifier needs at "
                            f"least 2 classes {layout}")
    return classes


def _val_folder(root: Path, val_dir: Optional[str], split_train: bool) -> Optional[str]:
    """The val folder's name, or None when val is carved from train (split_train: data.val_fraction set)."""
    if split_train:
        found = resolve_val_dir(root, val_dir, required=False)
        if found is not None:
            raise SplitError(f"data.val_fraction is set, but data.root '{root}' has a val folder '{found.name}/': "
                             "unset data.val_fraction to use that folder, or move the folder away to split train")
        return None
    return resolve_val_dir(root, val_dir).name


def discover_image_folder(root: str | Path, val_dir: Optional[str] = None,
                          split_train: bool = False) -> ImageFolderData:
    """Index root/train/<class>/*, the val folder's and root/test's (if any); classes come from train.

    val_dir: the val folder's name (default: whichever of val, valid, validation exists).
    split_train: val (and test, when there is no test/) will be carved from train after hashing,
    so val is empty here (a val folder is then an error: which one is meant?).
    """
    root = Path(root)
    layout = f"(expected {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg)"
    _check_root(root, layout)
    val_name = _val_folder(root, val_dir, split_train)
    classes = _train_classes(root, layout)
    test_name = TEST_DIR if (root / TEST_DIR).is_dir() and val_name != TEST_DIR else None
    meta: list[str] = []
    train, found = _scan_split(root, "train", classes)
    meta += found
    val = test = None
    if val_name is not None:
        _check_same_classes(root, classes, val_name, "every class needs validation images")
        val, found = _scan_split(root, val_name, classes)
        meta += found
    if test_name is not None:
        _check_same_classes(root, classes, test_name, "test/ must hold the same classes as train/")
        test, found = _scan_split(root, test_name, classes)
        meta += found
    return ImageFolderData(root, tuple(classes), train, val if val is not None else EMPTY, tuple(meta), test,
                           val_name or "")


def resolve_in_root(root: Path, rel: str) -> Path:
    """root / rel for a POSIX path relative to the data root; absolute paths and '..' are refused."""
    parts = PurePosixPath(rel).parts
    if not rel or PurePosixPath(rel).is_absolute() or ".." in parts:
        raise PipelineError(f"image path '{rel}' escapes data.root '{root}' (paths must be relative to it, "
                            "without '..')")
    return Path(root, *parts)
