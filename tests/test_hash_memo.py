"""fsutil.file_sha256: a weights file's SHA-256 remembered across processes while its stat signature holds."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import fsutil

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def memo(tmp_path, monkeypatch):
    """A fresh memo file; the in-process cache cleared, so each call acts as a new process; counts reads."""
    path = tmp_path / "memo" / "weights-sha256.json"
    monkeypatch.setenv(fsutil.HASH_MEMO_ENV, str(path))
    monkeypatch.setattr(fsutil, "RACY_SECONDS", 0.0)     # the files here were written a moment ago
    reads = []
    real = fsutil.sha256_file
    monkeypatch.setattr(fsutil, "sha256_file", lambda p: reads.append(p) or real(p))
    fsutil._sha256_cached.cache_clear()
    yield path, reads
    fsutil._sha256_cached.cache_clear()


def fresh_process_hash(path):
    fsutil._sha256_cached.cache_clear()
    return fsutil.file_sha256(path)


def test_a_weights_hash_is_read_once_then_remembered(tmp_path, memo):
    memo_path, reads = memo
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights" * 1000)
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert fresh_process_hash(weights) == expected and len(reads) == 1
    assert fresh_process_hash(weights) == expected and len(reads) == 1          # from the memo
    assert json.loads(memo_path.read_text())[str(weights.resolve())][-1] == expected


def test_an_edit_that_restores_size_and_mtime_is_hashed_again(tmp_path, memo):
    _, reads = memo
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"a" * 100)
    before = os.stat(weights)
    fresh_process_hash(weights)
    weights.write_bytes(b"b" * 100)                                        # same size
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))         # same mtime; ctime moves on
    assert fresh_process_hash(weights) == hashlib.sha256(b"b" * 100).hexdigest() and len(reads) == 2


def test_a_file_changed_just_now_is_not_remembered(tmp_path, memo, monkeypatch):
    memo_path, reads = memo
    monkeypatch.setattr(fsutil, "RACY_SECONDS", 2.0)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"fresh")
    fresh_process_hash(weights)
    fresh_process_hash(weights)
    assert len(reads) == 2 and not memo_path.exists()


@pytest.mark.parametrize("damage", [b"{not json", b"[1, 2]", b'{"x": 1}'])
def test_a_damaged_memo_is_ignored_and_rewritten(tmp_path, memo, damage):
    memo_path, reads = memo
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"w")
    memo_path.parent.mkdir()
    memo_path.write_bytes(damage)
    assert fresh_process_hash(weights) == hashlib.sha256(b"w").hexdigest()
    entries = json.loads(memo_path.read_text())
    assert str(weights.resolve()) in entries
    for n, forged_digest in enumerate(["0" * 63, "z" * 64], start=2):        # not a SHA-256: hashed again
        forged = {**entries, str(weights.resolve()): entries[str(weights.resolve())][:-1] + [forged_digest]}
        memo_path.write_text(json.dumps(forged))
        assert fresh_process_hash(weights) == hashlib.sha256(b"w").hexdigest() and len(reads) == n


def test_an_unwritable_memo_or_off_only_costs_the_hash(tmp_path, memo, monkeypatch):
    _, reads = memo
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"w")
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(fsutil.HASH_MEMO_ENV, str(blocker / "memo.json"))   # its folder is a file
    assert fresh_process_hash(weights) == fresh_process_hash(weights) and len(reads) == 2
    monkeypatch.setenv(fsutil.HASH_MEMO_ENV, "off")
    assert fsutil.hash_memo_path() is None
    fresh_process_hash(weights)
    assert len(reads) == 3 and list(tmp_path.glob("**/.*.tmp")) == []


def test_the_memo_keeps_the_newest_entries(tmp_path, memo, monkeypatch):
    memo_path, _ = memo
    monkeypatch.setattr(fsutil, "HASH_MEMO_ENTRIES", 3)
    files = [tmp_path / f"w{i}.pth" for i in range(5)]
    for f in files:
        f.write_bytes(f.name.encode())
        fresh_process_hash(f)
    assert list(json.loads(memo_path.read_text())) == [str(f.resolve()) for f in files[2:]]


def test_the_default_memo_is_in_the_users_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(fsutil.HASH_MEMO_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fsutil.hash_memo_path() == tmp_path / "feature-pipeline" / "weights-sha256.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fsutil.hash_memo_path() == tmp_path / "home" / ".cache" / "feature-pipeline" / "weights-sha256.json"
    monkeypatch.setattr(fsutil.os.path, "expanduser", lambda p: p)        # no home to be found: no memo
    assert fsutil.hash_memo_path() is None


def test_a_second_process_reads_the_memo(tmp_path, monkeypatch):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"w" * 10)
    monkeypatch.setenv(fsutil.HASH_MEMO_ENV, str(tmp_path / "memo.json"))
    code = ("import sys; from pipeline import fsutil; real = fsutil.sha256_file; reads = []\n"
            "fsutil.RACY_SECONDS = float(sys.argv[2])\n"
            "fsutil.sha256_file = lambda p: reads.append(p) or real(p)\n"
            "print(fsutil.file_sha256(sys.argv[1]), len(reads))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def child(racy_seconds):
        return subprocess.run([sys.executable, "-c", code, str(weights), racy_seconds], capture_output=True,
                              text=True, env=env, check=True).stdout.split()

    first = child("0")                        # the file was written a moment ago: trusted only with no wait
    assert first == [hashlib.sha256(b"w" * 10).hexdigest(), "1"]
    assert child("2") == [first[0], "0"]      # read from the memo, not from the file
