"""Splits users actually have: val folder names, a content-hash split of a train-only dataset, leakage.

- ``resolve_val_dir``: the val folder may be named val, valid or validation, or given by name.
- ``split_by_content``: a seeded val (and optional test) split of a train-only dataset, class by
  class, where each image's split is decided by a hash of its CONTENT and the seed alone
  (TensorFlow's retrain.py rule): adding or removing other images never moves an existing one,
  and identical files always land in the same split, so the split itself cannot leak duplicates.
  Each class gets val_fraction of its images in expectation, not exactly: an exact per-class
  count would have to move images whenever a class grows.
- ``find_leaks``: content hashes that appear in more than one split, with their paths; inside
  ``one_leak_warning_per_run`` (the CLI's run of its stages) ``first_warning`` lets only the first stage
  that sees a leak report it (every stage still counts it in its metrics entry).
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from pipeline import PipelineError

VAL_NAMES = ("val", "valid", "validation")
SPLITS = ("train", "val", "test")


class SplitError(PipelineError):
    """A dataset layout or split setting that cannot be used; the message names the folder or key."""


def _folders(root: Path) -> str:
    names = sorted(p.name + "/" for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return ", ".join(names) or "none"


def resolve_val_dir(root: Union[str, Path], name: Optional[str] = None, required: bool = True,
                    key: str = "data.val_dir") -> Optional[Path]:
    """root/<name>, or the one of root/val, root/valid, root/validation that exists.

    None when there is none and required is False (the caller then splits train). Two candidates
    at once (val/ and validation/) are an error: which one is meant is the user's call, via `key`.
    """
    root = Path(root)
    if name:
        path = root / name
        if not path.is_dir():
            raise SplitError(f"{key} '{name}': no folder {path} (folders in {root}: {_folders(root)})")
        return path
    found = [root / n for n in VAL_NAMES if (root / n).is_dir()]
    if len(found) > 1:
        raise SplitError(f"{root} has several val folders ({', '.join(p.name + '/' for p in found)}): set {key} "
                         "to the one to use")
    if found:
        return found[0]
    if required:
        raise SplitError(f"{root} has no val folder (looked for {', '.join(n + '/' for n in VAL_NAMES)}; folders "
                         f"there: {_folders(root)}): set {key} to its name, or data.val_fraction to split train")
    return None


def hash_file(path: Union[str, Path], block: int = 1 << 20) -> str:
    """SHA-256 of the file's bytes, hex: the image's identity, whatever its name."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def split_score(digest: str, seed: int) -> float:
    """A number in [0, 1) fixed by the content digest and the seed, uniform over digests."""
    h = hashlib.sha256(f"split:{seed}:{digest}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def check_fractions(val_fraction: float, test_fraction: float = 0.0) -> None:
    if not 0 < val_fraction < 1:
        raise SplitError(f"data.val_fraction = {val_fraction!r}: must be a number in (0, 1)")
    if not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise SplitError(f"data.test_fraction = {test_fraction!r}: must be >= 0 with val_fraction + test_fraction "
                         f"< 1 (val_fraction is {val_fraction})")


def check_split_settings(root, val_fraction: Optional[float], test_fraction: float, has_test_folder: bool) -> None:
    """data.val_fraction / data.test_fraction against the folders data.root has; SplitError naming the fix."""
    if val_fraction is None and test_fraction:
        raise SplitError(f"data.test_fraction = {test_fraction:g} splits train/ and needs data.val_fraction as well "
                         "(or a test/ folder with data.test_fraction = 0)")
    if test_fraction and has_test_folder:
        raise SplitError(f"data.test_fraction is set, but data.root '{root}' has a test/ folder: set "
                         "data.test_fraction = 0 to use that folder, or move it away to split train")


@dataclass
class SplitPlan:
    splits: list[str]                                   # per image: train, val or test
    counts: dict[str, dict[str, int]]                   # per class: images per split
    warnings: list[str] = field(default_factory=list)   # classes left without a val (or test) image

    def indices(self, split: str) -> list[int]:
        return [i for i, s in enumerate(self.splits) if s == split]


def split_by_content(digests: Sequence[str], labels: Sequence[int], classes: Sequence[str], val_fraction: float,
                     test_fraction: float = 0.0, seed: int = 0) -> SplitPlan:
    """Assign every image of a train-only dataset to train, val or test, class by class.

    digests : (n_images,) content hashes (hex); labels : (n_images,) class indices into classes.
    score = split_score(digest, seed): test if score < test_fraction, val if below
    test_fraction + val_fraction, else train. A class left with no train image is an error.
    """
    check_fractions(val_fraction, test_fraction)
    if len(digests) != len(labels):
        raise SplitError(f"{len(digests)} content hashes but {len(labels)} labels")
    splits = []
    for digest in digests:
        u = split_score(digest, seed)
        splits.append("test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train")
    counts = {c: {s: 0 for s in SPLITS} for c in classes}
    for label, s in zip(labels, splits):
        counts[classes[label]][s] += 1
    empty = [c for c, n in counts.items() if sum(n.values()) and n["train"] == 0]
    if empty:
        raise SplitError(f"class '{empty[0]}' has {sum(counts[empty[0]].values())} image(s), none left for train "
                         f"by data.val_fraction = {val_fraction}: add images or lower the fraction")
    wanted = ["val"] + (["test"] if test_fraction > 0 else [])
    warnings = [f"class '{c}' has no {s} image ({n['train']} train): its {s} accuracy cannot be measured"
                for c, n in counts.items() for s in wanted if sum(n.values()) and n[s] == 0]
    return SplitPlan(splits, counts, warnings)


def carve_train(digests: Sequence[str], labels: Sequence[int], classes: Sequence[str], val_fraction: float,
                test_fraction: float = 0.0, seed: int = 0) -> SplitPlan:
    """split_by_content for a dataset's train/ (extract's scan and load_dataset both carve with it),
    refusing a plan that leaves val empty (SplitError naming the fix)."""
    plan = split_by_content(digests, labels, classes, val_fraction, test_fraction, seed)
    if not plan.indices("val"):
        raise SplitError(f"data.val_fraction = {val_fraction:g} left no image of the {len(digests)} in train/ for "
                         "val: raise data.val_fraction or add images")
    return plan


@dataclass(frozen=True)
class Leak:
    digest: str
    paths: dict[str, tuple[str, ...]]    # split -> the paths with this content in it


def find_leaks(splits: dict[str, Sequence[tuple[str, str]]]) -> list[Leak]:
    """Contents that appear in more than one split; splits maps a split name to (path, digest) pairs.

    In the order first seen (splits in the order given, rows in order).
    """
    seen: dict[str, dict[str, list[str]]] = {}
    for split, rows in splits.items():
        for path, digest in rows:
            seen.setdefault(digest, {}).setdefault(split, []).append(str(path))
    return [Leak(d, {s: tuple(p) for s, p in where.items()}) for d, where in seen.items() if len(where) > 1]


def format_leaks(leaks: Sequence[Leak], limit: int = 10) -> str:
    """A warning naming the leaked images, at most `limit` of them, one per line."""
    if not leaks:
        return ""
    lines = [f"warning: {len(leaks)} image(s) appear in more than one split (train/val/test leakage: the "
             "scores of the later split are optimistic); remove or move the copies:"]
    for leak in leaks[:limit]:
        lines.append("  " + " = ".join(f"{s}:{p}" for s, ps in leak.paths.items() for p in ps))
    if len(leaks) > limit:
        lines.append(f"  ... and {len(leaks) - limit} more")
    return "\n".join(lines)


# Inside one_leak_warning_per_run: the leak reports already printed in this run (None: outside a run).
_RUN_WARNINGS: ContextVar[Optional[set]] = ContextVar("leak_warnings", default=None)


@contextmanager
def one_leak_warning_per_run() -> Iterator[None]:
    """Within this block each leak report is printed once, by the first stage that sees the cache."""
    token = _RUN_WARNINGS.set(set())
    try:
        yield
    finally:
        _RUN_WARNINGS.reset(token)


def first_warning(leaks: Sequence[Leak]) -> bool:
    """Whether to print the warning about leaks: always outside a run; inside one, the first time only."""
    if not leaks:
        return False
    shown = _RUN_WARNINGS.get()
    if shown is None:
        return True
    signature = tuple((leak.digest, tuple(leak.paths.items())) for leak in leaks)
    if signature in shown:
        return False
    shown.add(signature)
    return True


def manifest_leaks(manifests: dict) -> list[Leak]:
    """find_leaks over a cache's manifests (cache.SplitManifest: paths and sha256 per split)."""
    return find_leaks({s: list(zip(m.paths, m.sha256)) for s, m in manifests.items()})


def count_leaks(manifests: dict) -> int:
    """Images whose content is in more than one split of a cache's manifests (cache.SplitManifest)."""
    return len(manifest_leaks(manifests))


def warn_leaks(manifests: dict, prefix: str) -> int:
    """The leaks of a cache's manifests, warned about (prefix, a few paths and the count) once per run
    (one_leak_warning_per_run; always outside a run); returns their count."""
    leaks = manifest_leaks(manifests)
    if first_warning(leaks):
        print(prefix + format_leaks(leaks, limit=5))
    return len(leaks)
