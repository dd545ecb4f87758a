"""An append-only ledger of every head trained: one JSON object per line, safe for concurrent writers.

Each append takes an exclusive fcntl.flock on the file and writes its lines with one write call
(O_APPEND), so two processes appending at once never interleave their lines. A writer that died
mid-line leaves a line without its newline: the next append starts on a new line, and readers skip
(and count) lines that do not parse, so one torn line never hides the rest. POSIX only (fcntl).
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from pipeline.analysis import ranking_note
from pipeline.metrics import selection_note

LEDGER_FILE = "ledger.jsonl"


@dataclass
class LedgerEntry:
    cache_key: str                          # the feature cache's key: heads on the same features compare
    backbone: str
    head_type: str
    params: dict = field(default_factory=dict)
    val_acc: Optional[float] = None
    val_mean_per_class: Optional[float] = None
    test_acc: Optional[float] = None
    test_mean_per_class: Optional[float] = None
    seconds: Optional[float] = None
    run_dir: str = ""
    source: str = ""                        # head, logistic, sweep, benchmark, api
    time: str = ""                          # UTC, ISO 8601; filled in by append_entries when empty
    cache_file: str = ""                    # where the cache was when the head was trained
    n_val: Optional[int] = None             # val images its val figures were measured on (None: not recorded)

    @classmethod
    def from_dict(cls, d: dict) -> "LedgerEntry":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def append_entries(path: Union[str, Path], entries: Union[LedgerEntry, Sequence[LedgerEntry]]) -> int:
    """Append entries to the ledger at path (created if missing) under an exclusive lock; how many."""
    entries = [entries] if isinstance(entries, LedgerEntry) else list(entries)
    if not entries:
        return 0
    now = _utc_now()
    data = "".join(json.dumps({**dataclasses.asdict(e), "time": e.time or now}, sort_keys=True,
                              allow_nan=False, default=str) + "\n" for e in entries).encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":   # a writer died mid-line: do not glue onto it
            data = b"\n" + data
        view = memoryview(data)
        while view:                                         # one write normally; loop on a short write
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)                                        # closing releases the lock
    return len(entries)


@dataclass
class Ledger:
    entries: list[LedgerEntry]
    skipped: int = 0                        # lines that did not parse (a torn last line)


def read_ledger(path: Union[str, Path]) -> Ledger:
    """Every entry in file order; a missing ledger is empty."""
    path = Path(path)
    if not path.is_file():
        return Ledger([])
    entries, skipped = [], 0
    with open(path, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)              # never read a line while it is being written
        lines = f.read().splitlines()
    for line in lines:
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            entries.append(LedgerEntry.from_dict(d))
        except (ValueError, TypeError):
            skipped += 1
    return Ledger(entries, skipped)


def _score(v: Optional[float]) -> float:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else -math.inf


def best_heads(entries: Iterable[LedgerEntry], cache_key: str, top: Optional[int] = None) -> list[LedgerEntry]:
    """The heads trained on cache_key, best first by val top-1, then val mean per-class, then newest."""
    mine = [e for e in entries if e.cache_key == cache_key]
    mine.sort(key=lambda e: e.time, reverse=True)
    mine.sort(key=lambda e: (_score(e.val_acc), _score(e.val_mean_per_class)), reverse=True)
    return mine[:top]


@dataclass
class CacheSummary:
    cache_key: str
    backbone: str
    heads: int
    best: LedgerEntry
    last_time: str
    cache_file: str = ""                    # the file of its newest entry that names one


def caches(entries: Iterable[LedgerEntry]) -> list[CacheSummary]:
    """One summary per cache key, the most recently used cache first."""
    by_key: dict[str, list[LedgerEntry]] = {}
    for e in entries:
        by_key.setdefault(e.cache_key, []).append(e)
    out = [CacheSummary(k, es[-1].backbone, len(es), best_heads(es, k, 1)[0], max(e.time for e in es),
                        next((e.cache_file for e in reversed(es) if e.cache_file), ""))
           for k, es in by_key.items()]
    return sorted(out, key=lambda s: s.last_time, reverse=True)


def _f(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4f}"


def _params(p: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items()) or "defaults"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_best(entries: Sequence[LedgerEntry], cache_key: str, top: Optional[int] = 20) -> str:
    """The leaderboard of one cache: rank, head, params, val and test scores, seconds, source, run, time."""
    mine = best_heads(entries, cache_key)
    best = mine[:top]
    if not best:
        return f"no heads in the ledger for cache {cache_key}"
    tested = any(e.test_acc is not None for e in best)
    # with a test split, test leads the score columns (the headline); the ranking stays on val, as selection does
    scores = (lambda e: [_f(e.test_acc), _f(e.test_mean_per_class)]) if tested else (lambda e: [])  # noqa: E731
    rows = [[str(i), e.head_type, _params(e.params), *scores(e), _f(e.val_acc), _f(e.val_mean_per_class),
             "-" if e.seconds is None else f"{e.seconds:.2f}", e.source, e.run_dir, e.time]
            for i, e in enumerate(best, 1)]
    header = ["rank", "head", "params", *(["test top-1", "test mean/class"] if tested else []), "val top-1",
              "val mean/class", "seconds", "by", "run", "time"]
    note = selection_note(tested, "ranked by val top-1 (selection uses val only)")
    out = f"best heads on cache {cache_key} ({best[0].backbone})\n{_table(header, rows)}\n{note}"
    # one cache key, one val set: any entry's n_val holds for all
    n_val = next((e.n_val for e in mine if e.n_val), None)
    scored = [e.val_acc for e in mine[1:] if e.val_acc is not None]
    if n_val and best[0].val_acc is not None:
        out += "\n" + ranking_note(n_val, best[0].val_acc, scored, "heads trained on this cache", "best head")
    return out


def format_caches(entries: Sequence[LedgerEntry]) -> str:
    """Every cache in the ledger: key, backbone, heads tried, the best head, last used."""
    summaries = caches(entries)
    if not summaries:
        return "the ledger is empty"
    rows = [[s.cache_key[:16], s.backbone, str(s.heads), f"{s.best.head_type} {_params(s.best.params)}",
             _f(s.best.val_acc), s.last_time, s.cache_file or "-"] for s in summaries]
    return _table(["cache", "backbone", "heads", "best head", "val top-1", "last used", "file"], rows)
