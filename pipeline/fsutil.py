"""Crash-safe file operations: atomic replace with fsync, an inter-process lock, stale temp cleanup.

Every file another stage or a later run relies on is written under a temporary name, fsynced,
renamed into place and its folder fsynced: after a crash or `kill -9` a reader sees either the old
file or the new one, never a torn one. Temporary names carry the writer's pid
(`.<name>.<pid>.tmp`) so a later run can tell leftovers of a dead process from live work.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from pipeline import PipelineError

POLL_SECONDS = 0.1


class LockedError(PipelineError):
    """Another live process holds the lock."""

    def __init__(self, message: str, pid: Optional[int]) -> None:
        super().__init__(message)
        self.pid = pid


def temp_path(path: Path) -> Path:
    """The temporary name `path` is written under before the atomic rename."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make a rename durable: fsync the folder that holds the new name."""
    fsync_file(folder)  # a folder opens read-only like a file


def publish(tmp: Path, path: Path) -> Path:
    """fsync tmp, rename it to path atomically and fsync the folder."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


@contextmanager
def atomic_path(path: Path, tmp: Optional[Path] = None) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on any error it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp or temp_path(path)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Path, data: bytes, tmp: Optional[Path] = None) -> Path:
    with atomic_path(path, tmp) as tmp:
        tmp.write_bytes(data)
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: Path, name: str, any_pid: bool = False) -> int:
    """Delete `.<name>.<pid>.tmp` files left by dead processes (by every process when any_pid)."""
    removed = 0
    for tmp in Path(folder).glob(f".{name}.*.tmp"):
        pid_text = tmp.name[len(name) + 2:-len(".tmp")]
        if not pid_text.isdigit():
            continue
        if any_pid or not pid_alive(int(pid_text)):
            try:
                tmp.unlink()
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def exit_with_parent(parent_pid: int, poll_seconds: float = 0.5) -> None:
    """In a worker process: exit as soon as parent_pid is gone (even killed by `kill -9`).

    A daemon thread polls getppid(): when the parent dies the worker is re-parented, so its parent
    pid changes. Used as a ProcessPoolExecutor initializer, so a killed run leaks no worker.
    """
    import threading

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _read_pid(fd: int) -> Optional[int]:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class FileLock:
    """An exclusive `fcntl.flock` on `path`, holding the owner's pid.

    The kernel drops the lock when its process dies, even by `kill -9`, so a lock is never stale.
    timeout: seconds to wait for another holder; None waits as long as it takes, 0 not at all.
    """

    def __init__(self, path: Path, timeout: Optional[float] = None,
                 on_wait: Optional[Callable[[Optional[int]], None]] = None) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.on_wait = on_wait
        self._fd: Optional[int] = None

    def _try_lock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise

    def acquire(self) -> "FileLock":
        """Take the lock (waiting as timeout allows); LockedError if another process keeps it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not self._try_lock(fd):
                holder = _read_pid(fd)
                if self.timeout == 0:
                    raise LockedError(f"'{self.path}' is locked by pid {holder}", holder)
                if self.on_wait is not None:
                    self.on_wait(holder)
                deadline = None if self.timeout is None else time.monotonic() + self.timeout
                while not self._try_lock(fd):
                    if deadline is not None and time.monotonic() >= deadline:
                        holder = _read_pid(fd)
                        raise LockedError(f"'{self.path}' is still locked by pid {holder} after "
                                          f"{self.timeout:g} s", holder)
                    time.sleep(POLL_SECONDS)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stat_signature(st: os.stat_result) -> tuple[int, ...]:
    """(device, inode, size, mtime_ns, ctime_ns): unchanged while the file is. ctime cannot be set by a
    user, so an edit that restores the size and mtime (`touch -r`, `os.utime`) still changes it."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


RACY_SECONDS = 2.0          # a file changed this recently is not remembered (an edit within one timestamp tick)
HASH_MEMO_ENV = "FEATURE_PIPELINE_HASH_MEMO"   # the weights hash memo's file, or "off"
HASH_MEMO_ENTRIES = 64


def hash_memo_path() -> Optional[Path]:
    """Where file_sha256 remembers the hashes of weights files across processes: $FEATURE_PIPELINE_HASH_MEMO
    ("off" or "": nowhere), else feature-pipeline/weights-sha256.json in $XDG_CACHE_HOME or ~/.cache."""
    value = os.environ.get(HASH_MEMO_ENV)
    if value is not None:
        return None if value in ("", "off") else Path(value)
    home = os.path.expanduser("~")
    base = os.environ.get("XDG_CACHE_HOME") or (None if home == "~" else os.path.join(home, ".cache"))
    return None if base is None else Path(base) / "feature-pipeline" / "weights-sha256.json"   # no home: nowhere


def _read_hash_memo(memo: Path) -> dict:
    try:
        data = json.loads(memo.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable or damaged: only a speed-up, start again
        return {}
    return data if isinstance(data, dict) else {}


def _remember_hash(memo: Path, path: str, signature: tuple[int, ...], digest: str) -> None:
    entries = _read_hash_memo(memo)
    entries.pop(path, None)
    entries[path] = [*signature, digest]
    kept = dict(list(entries.items())[-HASH_MEMO_ENTRIES:])
    try:
        atomic_write_bytes(memo, json.dumps(kept, indent=0).encode("utf-8"),
                           memo.with_name(f".{memo.name}.{os.getpid()}.{threading.get_ident()}.tmp"))
    except OSError:  # a read-only home or a full disk: hashed again next time
        pass


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, signature: tuple[int, ...]) -> str:
    memo = hash_memo_path()
    known = _read_hash_memo(memo).get(path) if memo is not None else None
    if (isinstance(known, list) and len(known) == len(signature) + 1 and tuple(known[:-1]) == signature
            and isinstance(known[-1], str) and re.fullmatch("[0-9a-f]{64}", known[-1])):
        return known[-1]
    stable_before_ns = time.time_ns() - int(RACY_SECONDS * 1e9)
    digest = sha256_file(path)
    settled = (stat_signature(os.stat(path)) == signature                  # unchanged while read, and
               and max(signature[3], signature[4]) < stable_before_ns)    # its mtime and ctime settled
    if memo is not None and settled:
        _remember_hash(memo, path, signature, digest)
    return digest


def file_sha256(path: str | Path) -> str:
    """sha256_file of a weights file, remembered while its stat_signature holds: in this process and, in
    hash_memo_path(), across processes (a 1.2 GB checkpoint takes seconds to hash; scan.py's rule for images)."""
    return _sha256_cached(str(Path(path).resolve()), stat_signature(os.stat(path)))


def data_name(root: str | Path) -> str:
    """A data folder's identity as a file-name part: `<folder name>-<8 hex of the SHA-256 of its real path>`.

    Two folders of the same name in different places get different names; a link to a folder gets the
    folder's. Used for default run folder names and cache file names ('.' is replaced, so the first
    '.' of a cache file name ends it).
    """
    real = os.path.realpath(os.path.expanduser(str(root)))
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in os.path.basename(real))[:60] or "data"
    return f"{slug}-{hashlib.sha256(real.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
