"""Pre-scan of the image tree: hash and fully decode every image before any feature is computed.

Bad files (empty, truncated, corrupt, not images, decompression bombs, unreadable) are skipped
and listed with a reason in `bad_files.json` in the run folder; macOS `._*` AppleDouble files are
listed too but are not counted as bad. The rows that remain are fixed before extraction starts,
so a skipped image is never replaced by another one and row i keeps its path and label.

Stat fast path: a file whose (device, inode, size, mtime_ns, ctime_ns) equals an earlier scan's
reuses that scan's hash and verdict instead of being read again. ctime cannot be set by a user,
so an edit that restores the size and mtime (`touch -r`, `os.utime`) still changes it. Files
modified within RACY_SECONDS of a scan are not remembered (a second edit inside the same
timestamp tick would look unchanged) and are hashed again next time. `extract.verify: content`
skips the fast path: every file is read, hashed and decoded on every run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from PIL import Image

from pipeline import PipelineError
from pipeline import cache as fc
from pipeline.distributed import SINGLE, DistContext, unshard
from pipeline.fsutil import RACY_SECONDS, stat_signature
from pipeline.data import ImageFolderData, Split, image_problem, read_image_bytes, resolve_in_root
from pipeline.metrics import write_json
from pipeline.scan_index import ScanEntry, read_scan_index, remove_stale_scan_temps, write_scan_index
from pipeline.splits import carve_train, check_split_settings, count_leaks, warn_leaks

BAD_FILES = "bad_files.json"
APPLEDOUBLE_REASON = "macOS AppleDouble metadata file (._*), not an image"


@dataclass(frozen=True)
class BadFile:
    path: str      # relative to the data root
    reason: str    # empty, not_an_image, truncated, corrupt, decompression_bomb, unreadable, broken_symlink,
                   # bad_name
    detail: str

    def to_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason, "detail": self.detail}


@dataclass
class ScanResult:
    data: ImageFolderData                   # the readable images only: the cache's rows
    manifests: dict[str, fc.SplitManifest]  # per split: paths, labels, sha256, aligned with data
    bad: list[BadFile]
    metadata_files: tuple[str, ...]
    n_files: int                            # image files considered: readable + bad
    n_hashed: int                           # files read this run (the rest came from the stat index)
    split_rule: dict = field(default_factory=lambda: dict(fc.DEFAULT_SPLIT_RULE))  # the cache's "split" attribute

    @property
    def n_bad(self) -> int:
        return len(self.bad)


class TooManyBadFiles(PipelineError):
    pass


def _check_file(root: Path, rel: str, known: Optional[ScanEntry], use_stat: bool,
                stable_before_ns: int) -> tuple[Optional[ScanEntry], bool, bool]:
    """(entry, hashed now, safe to remember) for one file."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return ScanEntry((), "", "bad_name", "the file name is not valid UTF-8; rename the file"), False, False
    path = resolve_in_root(root, rel)
    try:
        st = os.stat(path)
    except OSError as e:
        if os.path.islink(path):
            return ScanEntry((), "", "broken_symlink", f"link to missing '{os.readlink(path)}'"), False, False
        return ScanEntry((), "", "unreadable", e.strerror or str(e)), False, False
    if not stat.S_ISREG(st.st_mode):
        return ScanEntry((), "", "unreadable", "not a regular file"), False, False
    signature = stat_signature(st)
    if use_stat and known is not None and known.stat == signature:
        return known, False, False
    try:
        data = read_image_bytes(path)  # re-checks: regular file, size cap
        after = stat_signature(os.stat(path))
    except OSError as e:
        return ScanEntry((), "", "unreadable", e.strerror or str(e)), False, False
    problem = image_problem(data)
    reason, detail = problem if problem else ("", "")
    entry = ScanEntry(signature, hashlib.sha256(data).hexdigest(), reason, detail)
    settled = after == signature and max(st.st_mtime_ns, st.st_ctime_ns) < stable_before_ns
    return entry, True, settled


def scan_images(data: ImageFolderData, index_path: Optional[Path], verify: str = "stat",
                workers: int = 0, dist: DistContext = SINGLE) -> ScanResult:
    """Hash and decode-check every image of data (threads: max(1, workers)); keep the readable ones.

    index_path: the stat index to read and update (None: no fast path, nothing written).
    Under torchrun each rank checks every world_size-th file and the ranks exchange verdicts, so
    every rank returns the same result; only rank 0 writes the index.
    """
    use_stat = verify == "stat" and index_path is not None
    known = read_scan_index(index_path) if use_stat else {}
    stable_before_ns = time.time_ns() - int(RACY_SECONDS * 1e9)
    splits = {s: data.split(s) for s in data.splits}
    todo = [rel for s in data.splits for rel in splits[s].paths]

    def check(rel: str):
        return _check_file(data.root, rel, known.get(rel), use_stat, stable_before_ns)

    with warnings.catch_warnings():
        # Pillow warns about large images before the limit that decode_image enforces as an error.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        mine = dist.shard(todo)
        if workers > 0:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(check, mine))
        else:
            results = [check(rel) for rel in mine]
    results = unshard(dist.all_gather(results))

    by_path = dict(zip(todo, results))
    bad, manifests, kept = [], {}, {}
    for split in data.splits:
        paths, labels, hashes = [], [], []
        for rel, label in zip(splits[split].paths, splits[split].labels):
            entry = by_path[rel][0]
            if entry.reason:
                bad.append(BadFile(rel, entry.reason, entry.detail))
            else:
                paths.append(rel)
                labels.append(label)
                hashes.append(entry.sha256)
        manifests[split] = fc.SplitManifest(tuple(paths), tuple(labels), tuple(hashes))
        kept[split] = Split(tuple(paths), tuple(labels))
    if use_stat and dist.is_main:
        _update_index(index_path, known, by_path)
    valid = dataclasses.replace(data, train=kept["train"], val=kept["val"], test=kept.get("test"))
    return ScanResult(valid, manifests, bad, data.metadata_files, len(todo),
                      sum(1 for r in results if r[1]))


def _update_index(index_path: Path, known: dict[str, ScanEntry], by_path: dict) -> None:
    """Remember settled files for the next run's stat fast path; an unwritable cache folder only costs speed."""
    entries = {rel: entry for rel, (entry, hashed, settled) in by_path.items()
               if settled or (not hashed and entry.stat and known.get(rel) == entry)}
    if entries == known:
        return
    try:
        remove_stale_scan_temps(index_path)
        write_scan_index(index_path, entries)
    except OSError:
        pass


def write_bad_files_report(run_dir: Path, scan: ScanResult, max_bad_fraction: float) -> Path:
    """bad_files.json in the run folder: every skipped file and why (written on every scan)."""
    path = Path(run_dir) / BAD_FILES
    write_json(path, {
        "data_root": str(scan.data.root), "image_files": scan.n_files, "bad": scan.n_bad,
        "bad_fraction": round(scan.n_bad / max(scan.n_files, 1), 6), "max_bad_fraction": max_bad_fraction,
        "files": [b.to_dict() for b in scan.bad],
        "metadata_files": [{"path": p, "reason": "appledouble", "detail": APPLEDOUBLE_REASON}
                           for p in scan.metadata_files]})
    return path


def check_bad_files(scan: ScanResult, max_bad_fraction: float, report: Path) -> None:
    """Abort when more than max_bad_fraction of the files are bad, or a class lost every image."""
    if scan.n_bad > max_bad_fraction * scan.n_files:
        raise TooManyBadFiles(
            f"{scan.n_bad} of {scan.n_files} image files in data.root '{scan.data.root}' "
            f"({100 * scan.n_bad / scan.n_files:.1f}%) are unreadable, more than data.max_bad_fraction="
            f"{max_bad_fraction:g}; nothing was extracted. Each file and its reason: {report}. "
            "Fix or remove them, or raise data.max_bad_fraction")
    rule = scan.split_rule  # a split carved off train by content may lack a class (split_by_content warned)
    for split in [s for s in scan.data.splits if s == "train" or rule.get(s) == "folder"]:
        present = set(scan.data.split(split).labels)
        for label, cls in enumerate(scan.data.classes):
            if label not in present:
                raise PipelineError(f"class '{cls}' has no readable images in '{scan.data.root / split / cls}' "
                                    f"(all skipped, see {report})")


# ----------------------------------------------------------------------------- splits and leaks
def _subset(m: fc.SplitManifest, rows: list[int]) -> fc.SplitManifest:
    return fc.SplitManifest(tuple(m.paths[i] for i in rows), tuple(m.labels[i] for i in rows),
                            tuple(m.sha256[i] for i in rows))


def split_scan(scan: ScanResult, val_fraction: Optional[float], test_fraction: float = 0.0,
               seed: int = 0) -> ScanResult:
    """The scan with its split rule; with val_fraction, val (and test) carved off train by content hash.

    Uses the hashes the scan already has (no second read). Row order within each split is train/'s
    order, so the cache's rows depend only on the images and the rule.
    """
    data = scan.data
    test = "folder" if data.test is not None else "none"
    check_split_settings(data.root, val_fraction, test_fraction, data.test is not None)
    if val_fraction is None:
        return dataclasses.replace(scan, split_rule={"val": "folder", "val_dir": data.val_dir, "test": test})
    train = scan.manifests["train"]
    plan = carve_train(train.sha256, train.labels, data.classes, val_fraction, test_fraction, seed)
    for warning in plan.warnings:
        print(f"extract: warning: {warning}")
    manifests = {s: _subset(train, plan.indices(s)) for s in ("train", "val")}
    if test_fraction:
        manifests["test"], test = _subset(train, plan.indices("test")), "content"
    elif data.test is not None:
        manifests["test"] = scan.manifests["test"]
    kept = {s: Split(m.paths, m.labels) for s, m in manifests.items()}
    rule = {"val": "content", "val_fraction": val_fraction, "test": test, "test_fraction": test_fraction,
            "seed": seed}
    data = dataclasses.replace(data, train=kept["train"], val=kept["val"], test=kept.get("test"))
    return dataclasses.replace(scan, data=data, manifests=manifests, split_rule=rule)


def report_leaks(manifests: dict[str, fc.SplitManifest], quiet: bool = False) -> int:
    """Images whose content is in more than one split (from the scan's hashes): a warning naming a few
    of them and the count, printed unless quiet; returns the count."""
    return count_leaks(manifests) if quiet else warn_leaks(manifests, "extract: ")  # warned once per run
