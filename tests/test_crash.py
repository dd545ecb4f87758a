"""Crash safety, in child processes: kill -9 at random moments, Ctrl-C once and twice, two writers at once.

After every kill the cache folder must hold no file a reader could take as complete but that is
not, the work lost must be at most one chunk, and the final features must equal a clean run's
bitwise.
"""
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import cache as fc
from tests import child
from tests.conftest import make_image_folder, tiny_overrides

N_TRAIN, N_VAL = 40, 10          # per class, two classes: 100 images
N_IMAGES = 2 * (N_TRAIN + N_VAL)
CHUNK, BATCH = 8, 4              # 13 chunks
KILLS = 10
MIN_KILLS_MID_EXTRACTION = 5


def argv(setup, cache_dir: Path, name: str, *extra: str) -> list[str]:
    sets = setup["overrides"] + [f"extract.cache_dir={cache_dir}", f"run.name={name}"] + list(extra)
    return [arg for s in sets for arg in ("--set", s)] + ["extract"]


def forwarded(log: Path) -> int:
    return sum(int(line) for line in log.read_text().split()) if log.exists() else 0


def inspect(cache_dir: Path, clean: fc.FeatureCache) -> tuple[set, bool]:
    """(sha256 of rows saved as chunks, complete?) after asserting nothing is half-written under a real name."""
    saved, complete = set(), False
    if not cache_dir.exists():
        return saved, complete
    for path in cache_dir.iterdir():
        if path.name.startswith("."):
            assert path.name.endswith(".tmp"), path  # a temporary name, never read
        elif path.name.endswith(".lock") or path.name.startswith("scan-"):
            continue
        elif path.name.endswith(".partial"):
            store = fc.ChunkStore(path, clean.attrs["config_key"], "float32")
            for chunk in path.iterdir():
                if chunk.name.startswith("."):
                    assert chunk.name.endswith(".tmp"), chunk
                else:
                    saved |= set(store.read_chunk(chunk)[0])  # raises if a chunk is damaged
        else:
            assert path.suffix == ".h5", path
            cache = fc.read_cache(path, clean.attrs["key"])  # raises unless complete and intact
            assert np.array_equal(cache.train.features, clean.train.features)
            assert np.array_equal(cache.val.features, clean.val.features)
            complete = True
    return saved, complete


def run_to_end(setup, cache_dir: Path, tmp: Path, name: str) -> dict:
    p = child.start(child.run_cli, argv(setup, cache_dir, name), str(tmp / f"{name}.out"))
    p.join(120)
    assert p.exitcode == 0, (tmp / f"{name}.out").read_text()
    return json.loads((setup["runs"] / name / "metrics.json").read_text())["extract"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    root = make_image_folder(tmp / "imgs", n_train=N_TRAIN, n_val=N_VAL)
    # One thread: the children run one at a time, and torch's thread pool suffers on a busy machine.
    overrides = tiny_overrides(tmp, root) + [f"extract.chunk_size={CHUNK}", f"extract.batch_size={BATCH}",
                                             "run.num_threads=1"]
    setup = {"overrides": overrides, "runs": tmp / "runs"}
    child.call(os.getpid)  # start the forkserver (imports torch) before timing a run
    # The clean run, in a child too (same threads as the others), timed: start-up, then extraction.
    log = tmp / "clean.log"
    t0 = time.monotonic()
    p = child.start(child.run_cli, argv(setup, tmp / "clean", "clean"), str(tmp / "clean.out"), str(log))
    while p.is_alive() and not forwarded(log):
        time.sleep(0.002)
    setup["startup"] = time.monotonic() - t0
    p.join(120)
    setup["seconds"] = time.monotonic() - t0
    assert p.exitcode == 0, (tmp / "clean.out").read_text()
    entry = json.loads((tmp / "runs" / "clean" / "metrics.json").read_text())["extract"]
    setup["clean"] = fc.read_cache(entry["cache_file"])
    assert entry["rows_extracted"] == N_IMAGES and entry["chunks_written"] == -(-N_IMAGES // CHUNK)
    return setup


def test_kill_9_at_random_moments(setup, tmp_path):
    rng = random.Random(1234)
    cache_dir = tmp_path / "cache"
    kills = mid_extraction = cycles = total_forwarded = 0
    worst = 0
    saved, complete = set(), False
    while kills < KILLS or mid_extraction < MIN_KILLS_MID_EXTRACTION:
        assert cycles < 80, f"only {kills} kills in {cycles} runs"
        cycles += 1
        log = tmp_path / f"forward-{cycles}.log"
        p = child.start(child.run_cli, argv(setup, cache_dir, f"c{cycles}"), str(tmp_path / f"c{cycles}.out"),
                        str(log))
        if cycles % 3 == 0:  # at any moment, start-up included
            time.sleep(rng.uniform(0.0, setup["seconds"]))
        else:  # while the backbone runs, chunks are saved or the complete file is assembled
            while p.is_alive() and not forwarded(log):
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, setup["seconds"] - setup["startup"]))
        killed = p.is_alive()
        if killed:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:  # it finished (and was reaped) between the check and the kill
                killed = False
        p.join(120)
        assert killed or p.exitcode == 0, (tmp_path / f"c{cycles}.out").read_text()
        before = saved
        saved, complete = inspect(cache_dir, setup["clean"])
        done = N_IMAGES if complete else len(saved)
        lost = forwarded(log) - (done - len(before))  # computed in this run but not saved: redone next run
        total_forwarded += forwarded(log)
        assert 0 <= lost <= CHUNK, (cycles, lost)
        worst = max(worst, lost)
        if killed:
            kills += 1
            mid_extraction += forwarded(log) > 0 and not complete
        else:
            entry = json.loads((setup["runs"] / f"c{cycles}" / "metrics.json").read_text())["extract"]
            assert entry["rows_extracted"] == N_IMAGES - len(before) or entry["cache_hit"]
            assert entry.get("rows_resumed", 0) == (len(before) if not entry["cache_hit"] else 0)
        if complete:  # start over, to crash it again from scratch
            shutil.rmtree(cache_dir)
            saved = set()
    entry = run_to_end(setup, cache_dir, tmp_path, "final")
    assert entry["rows_extracted"] == N_IMAGES - len(saved) and entry["rows_resumed"] == len(saved)
    saved, complete = inspect(cache_dir, setup["clean"])  # bitwise equal to the clean run
    assert complete and not fc.partial_dir(Path(entry["cache_file"])).exists()
    print(f"\ncrash test: {kills} kills ({mid_extraction} mid-extraction) in {cycles} runs, "
          f"at most {worst} rows (chunk size {CHUNK}) redone after a kill")


def wait_for_chunk(cache_dir: Path, p, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not list(cache_dir.glob("*.partial/chunk-*.h5")):
        assert p.is_alive() and time.monotonic() < deadline, "extraction ended before saving a chunk"
        time.sleep(0.005)


def test_ctrl_c_finishes_the_batch_saves_and_says_how_to_resume(setup, tmp_path):
    cache_dir = tmp_path / "cache"
    log, out = tmp_path / "forward.log", tmp_path / "interrupted.out"
    # With a DataLoader worker in the same process group, as a terminal's Ctrl-C reaches it.
    p = child.start(child.run_cli, argv(setup, cache_dir, "i", "data.num_workers=1"), str(out), str(log), True)
    wait_for_chunk(cache_dir, p)
    os.killpg(p.pid, signal.SIGINT)
    p.join(60)
    text = out.read_text()
    assert p.exitcode == 130, text
    assert "Ctrl-C: finishing the current batch and saving progress" in text
    assert "extract: interrupted; " in text and "Run the same command again to resume" in text
    saved, complete = inspect(cache_dir, setup["clean"])
    assert not complete and len(saved) == forwarded(log)  # the batch in flight was finished and saved
    entry = run_to_end(setup, cache_dir, tmp_path, "resumed")
    assert entry["rows_resumed"] == len(saved) and entry["rows_extracted"] == N_IMAGES - len(saved)
    assert inspect(cache_dir, setup["clean"])[1]


def test_second_ctrl_c_stops_at_once_and_is_still_safe(setup, tmp_path):
    cache_dir = tmp_path / "cache"
    out = tmp_path / "twice.out"
    p = child.start(child.run_cli, argv(setup, cache_dir, "i2"), str(out), None, True)
    wait_for_chunk(cache_dir, p)
    os.killpg(p.pid, signal.SIGINT)
    os.killpg(p.pid, signal.SIGINT)
    t0 = time.monotonic()
    p.join(60)
    assert p.exitcode == 130 and time.monotonic() - t0 < 10, out.read_text()
    saved, complete = inspect(cache_dir, setup["clean"])
    assert not complete and saved
    run_to_end(setup, cache_dir, tmp_path, "after-twice")
    assert inspect(cache_dir, setup["clean"])[1]


def test_second_extraction_of_the_same_key_waits_for_the_first(setup, tmp_path):
    cache_dir = tmp_path / "cache"
    first = child.start(child.run_cli, argv(setup, cache_dir, "first"), str(tmp_path / "first.out"),
                        str(tmp_path / "first.log"), False, 0.05)
    wait_for_chunk(cache_dir, first)
    second = child.start(child.run_cli, argv(setup, cache_dir, "second"), str(tmp_path / "second.out"))
    first.join(120)
    second.join(120)
    assert first.exitcode == 0 and second.exitcode == 0
    assert f"waiting for pid {first.pid}, which is extracting the same features" in \
        (tmp_path / "second.out").read_text()
    metrics = {n: json.loads((setup["runs"] / n / "metrics.json").read_text())["extract"]
               for n in ("first", "second")}
    assert metrics["first"]["rows_extracted"] == N_IMAGES
    assert metrics["second"]["cache_hit"] is True  # it found the first one's cache complete
    assert inspect(cache_dir, setup["clean"])[1]


def test_lock_timeout_zero_exits_naming_the_holder(setup, tmp_path):
    cache_dir = tmp_path / "cache"
    first = child.start(child.run_cli, argv(setup, cache_dir, "holder"), str(tmp_path / "holder.out"),
                        str(tmp_path / "holder.log"), False, 0.05)
    wait_for_chunk(cache_dir, first)
    second = child.start(child.run_cli, argv(setup, cache_dir, "refused", "extract.lock_timeout=0"),
                         str(tmp_path / "refused.out"))
    second.join(60)
    first.join(120)
    assert second.exitcode == 2 and first.exitcode == 0
    assert f"is locked by pid {first.pid}: another extraction of the same features is running" in \
        (tmp_path / "refused.out").read_text()
