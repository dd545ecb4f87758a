"""The run folder as a small transactional store: one lock, staged outputs, one commit point.

A training stage's outputs are one unit: its model file, the SHA256SUMS that records it, its
metrics.json entry, the config.json it was run with and its reports/. `Publication` writes all of
them into a staging folder `.stage-<stage>.<pid>.tmp/` inside the run folder; `commit` then, under
the run folder's lock,

1. writes the merged SHA256SUMS and metrics.json into the staging folder too;
2. writes a journal `.publish.json` (the renames and removals to do) under a temporary name and
   renames it into place: this rename is the commit point;
3. renames every staged file over its real name, removes what the new set replaces (reports of
   the same model that it no longer has), then the journal and the staging folder.

A crash before step 2 leaves the old set (the next run removes the dead process's staging folder);
a crash after it is rolled forward by whoever takes the lock next (`recover`, also run by readers
through `reading`): so a reader sees either the old complete set or the new complete set.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from pipeline import PipelineError
from pipeline.fsutil import FileLock, fsync_dir, fsync_file, pid_alive, sha256_file

RUN_LOCK = ".run.lock"          # held by a process that runs stages in this folder
PUBLISH_LOCK = ".publish.lock"  # held briefly: to commit or roll forward, and by readers while they read
JOURNAL = ".publish.json"
STAGING_PREFIX = ".stage-"

_held: dict[tuple[str, str], list] = {}  # (folder, lock name) -> [FileLock, depth]: re-entrant in a process


class RunFolderError(PipelineError):
    pass


def _rename(src: Path, dst: Path) -> None:
    """os.replace; one function, so the crash tests can kill the process at any rename of a publish."""
    os.replace(src, dst)


@contextmanager
def _locked(run_dir: Path, name: str, on_wait: Optional[Callable] = None) -> Iterator[None]:
    run_dir = Path(run_dir)
    key = (str(run_dir.resolve()), name)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(run_dir / name, on_wait=on_wait).acquire()
    except OSError as e:
        raise RunFolderError(f"cannot use the run folder '{run_dir}': {e.strerror} (choose a writable "
                             "run.output_dir)") from None
    _held[key] = [lock, 1]
    try:
        yield
    finally:
        del _held[key]
        lock.release()


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder for this process's stages: a second run in the same folder waits for it.

    Taking it rolls an interrupted publish forward and removes dead processes' temporary files.
    """
    def say(pid: Optional[int]) -> None:
        print(f"run folder '{run_dir}' is in use by pid {pid}; waiting for it to finish "
              "(or use another run.name)", flush=True)

    with _locked(run_dir, RUN_LOCK, say):
        with _locked(run_dir, PUBLISH_LOCK):
            recover(run_dir)
            remove_leftovers(run_dir)
            check_records(run_dir)
        yield


def check_records(run_dir: Path) -> None:
    """Raise (one line: the file, what to do) if SHA256SUMS or metrics.json is damaged: before any work."""
    from pipeline.artifacts import SUMS_FILE, read_sums
    from pipeline.metrics import read_metrics

    read_sums(Path(run_dir) / SUMS_FILE)
    read_metrics(run_dir)


def publish_lock(run_dir: Path):
    """The short lock under which a run folder's files change (commit, roll forward, metrics updates)."""
    return _locked(run_dir, PUBLISH_LOCK)


@contextmanager
def reading(run_dir: Path) -> Iterator[None]:
    """Read a consistent set: no publish runs meanwhile, and an interrupted one is completed first."""
    run_dir = Path(run_dir)
    lock = _locked(run_dir, PUBLISH_LOCK)
    try:
        if not run_dir.is_dir():
            raise RunFolderError("no run folder")
        lock.__enter__()
    except RunFolderError:
        if (run_dir / JOURNAL).exists():
            raise
        yield  # a missing or read-only folder: nobody can be writing to it
        return
    try:
        recover(run_dir)
        yield
    finally:
        lock.__exit__(None, None, None)


def _read_journal(path: Path) -> dict:
    try:
        journal = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(journal, dict) or not isinstance(journal.get("renames"), list):
            raise ValueError("no list of renames")
        return journal
    except (OSError, ValueError) as e:
        raise RunFolderError(f"'{path}' (the record of an interrupted publish) is damaged ({e}): the run "
                             f"folder may mix two runs' files; delete '{path}' and run the stages again") from None


def recover(run_dir: Path) -> bool:
    """Finish a publish that was committed but interrupted (call under the publish lock); True if one was."""
    run_dir = Path(run_dir)
    path = run_dir / JOURNAL
    if not path.exists():
        return False
    journal = _read_journal(path)
    _apply(run_dir, journal)
    print(f"run folder: completed the publish of '{journal.get('stage')}' interrupted in '{run_dir}'",
          file=sys.stderr)
    return True


def _apply(run_dir: Path, journal: dict) -> None:
    """The renames and removals of a committed journal; idempotent, so a crash in here is rolled forward."""
    folders = {run_dir}
    for src, dst in journal["renames"]:
        src, dst = run_dir / src, run_dir / dst
        if src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            _rename(src, dst)
            folders.add(dst.parent)
    for name in journal.get("remove", []):
        (run_dir / name).unlink(missing_ok=True)
    for folder in folders:
        fsync_dir(folder)
    (run_dir / JOURNAL).unlink()
    fsync_dir(run_dir)
    staging = journal.get("staging")
    if staging:
        shutil.rmtree(run_dir / staging, ignore_errors=True)


def _pid_of(name: str) -> Optional[int]:
    """The writer's pid in `.stage-<stage>.<pid>.tmp` or `.<name>.<pid>.tmp`."""
    parts = name.split(".")
    return int(parts[-2]) if len(parts) >= 3 and parts[-1] == "tmp" and parts[-2].isdigit() else None


def remove_leftovers(run_dir: Path) -> int:
    """Delete staging folders and `.<name>.<pid>.tmp` files of processes that are gone (under the lock)."""
    removed = 0
    for folder in (Path(run_dir), Path(run_dir) / "reports"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            pid = _pid_of(path.name) if path.name.startswith(".") else None
            if pid is None or pid == os.getpid() or pid_alive(pid):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
    return removed


def _same_root(a: str, b: str) -> bool:
    from pipeline.runname import canonical_root

    return a == b or canonical_root(a) == canonical_root(b)  # demo:flowers is also its folder's path


def check_same_data(run_dir: Path, data_root: str) -> None:
    """A run folder belongs to one dataset: stop, naming run.name, before a stage mixes another one in.

    The data a folder's results came from is the data.root of its config.json (written with them).
    """
    from pipeline.runname import data_run_name

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))["data"]["root"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # config.json only describes; a damaged one is rewritten by the next publish
    if not _same_root(str(recorded), str(data_root)):
        slug = "demo" if str(data_root).startswith("demo:") else \
            "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(str(data_root)).name)[:60] or "data"
        raise RunFolderError(f"run folder '{run_dir}' holds results on data.root '{recorded}', not on "
                             f"'{data_root}': give this data its own run folder (leave run.name unset to use "
                             f"'{data_run_name(str(data_root))}', or --set run.name={slug}), or remove the old folder")


class Publication:
    """The outputs of one stage, staged in the run folder until `commit` publishes them as one unit.

    with Publication(run_dir, "head") as pub:
        digest = pub.save_model("head.pt", lambda tmp: torch.save(obj, tmp))
        write_reports(pub.staging, ...)            # staged as reports/..., published beside the model
        pub.commit(metrics_entry=entry, config=cfg.to_dict())
    Leaving the block without commit (an error, Ctrl-C) discards everything staged.
    """

    def __init__(self, run_dir: Path, stage: str, report_prefix: Optional[str] = None) -> None:
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.report_prefix = report_prefix if report_prefix is not None else f"{stage}_"
        self.staging = self.run_dir / f"{STAGING_PREFIX}{stage}.{os.getpid()}.tmp"
        self.model: Optional[tuple[str, str]] = None  # (file name, sha256)
        self.remove: list[str] = []
        self.committed = False

    def __enter__(self) -> "Publication":
        try:
            if self.staging.exists():
                shutil.rmtree(self.staging)
            self.staging.mkdir(parents=True)
        except OSError as e:
            raise RunFolderError(f"cannot write to the run folder '{self.run_dir}': {e.strerror} (choose a "
                                 "writable run.output_dir, or free disk space)") from None
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            shutil.rmtree(self.staging, ignore_errors=True)

    def final_path(self, staged: Path) -> Path:
        """Where a file written under the staging folder is published."""
        return self.run_dir / Path(staged).relative_to(self.staging)

    def save_model(self, name: str, dump: Callable[[Path], Any]) -> str:
        """dump(path) the model into the staging folder; its SHA-256 is recorded at the commit."""
        staged = self.staging / name
        try:
            dump(staged)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            raise RunFolderError(f"cannot write the {self.stage} model into '{self.run_dir}': "
                                 f"{getattr(e, 'strerror', None) or str(e).splitlines()[0]} (free disk space or "
                                 "make the folder writable, then run the stage again; the previous model is "
                                 "unchanged)") from None
        self.model = (name, sha256_file(staged))
        return self.model[1]

    def adopt_model(self, source: Path, name: str) -> str:
        """Publish an existing file (finetune's best-so-far checkpoint) as the model `name`.

        source is linked (or copied) into the staging folder and removed only at the commit.
        """
        staged = self.staging / name
        try:
            try:
                os.link(source, staged)
            except OSError:
                shutil.copy2(source, staged)
        except OSError as e:
            raise RunFolderError(f"cannot stage '{source}' for publishing: {e.strerror} (free disk space, then "
                                 "run the stage again with finetune.resume=true)") from None
        digest = sha256_file(staged)
        self.model = (name, digest)
        self.remove.append(str(Path(source).relative_to(self.run_dir)))
        return digest

    def commit(self, metrics_entry: Optional[dict] = None, config: Optional[dict] = None,
               forget: tuple[str, ...] = ()) -> None:
        """Publish everything staged as one unit (see the module docstring).

        metrics_entry: this stage's entry in metrics.json (the model's sha256 is added to it);
        config: the config the results came from (config.json); forget: file names whose SHA256SUMS
        records go (files the new set removes).
        """
        with _locked(self.run_dir, PUBLISH_LOCK):
            recover(self.run_dir)
            try:
                journal = self._stage_records(metrics_entry, config, forget)
            except OSError as e:
                raise RunFolderError(f"cannot publish the {self.stage} stage's files in '{self.run_dir}': "
                                     f"{e.strerror} (free disk space or make the folder writable, then run "
                                     "the stage again; the previous files are unchanged)") from None
            _rename(self.run_dir / f"{JOURNAL}.{os.getpid()}.tmp", self.run_dir / JOURNAL)  # the commit point
            fsync_dir(self.run_dir)
            self.committed = True
            _apply(self.run_dir, journal)

    def _stage_records(self, metrics_entry: Optional[dict], config: Optional[dict], forget: tuple[str, ...]) -> dict:
        """Stage SHA256SUMS, metrics.json and config.json; write the journal under its temporary name."""
        from pipeline.artifacts import SUMS_FILE, read_sums, sums_text
        from pipeline.metrics import METRICS_FILE, read_metrics

        staged = [p for p in sorted(self.staging.rglob("*")) if p.is_file()]
        if self.model is not None or forget:
            records = read_sums(self.run_dir / SUMS_FILE)  # raises if damaged, before anything is replaced
            for name in forget:
                records.pop(name, None)
            if self.model is not None:
                records[self.model[0]] = self.model[1]
            staged.append(self._write(SUMS_FILE, sums_text(records)))
        if metrics_entry is not None:
            metrics = read_metrics(self.run_dir)  # raises if damaged
            if self.model is not None:
                metrics_entry["model_sha256"] = self.model[1]
            metrics[self.stage] = metrics_entry
            staged.append(self._write(METRICS_FILE, json.dumps(metrics, indent=2) + "\n"))
        if config is not None:
            staged.append(self._write("config.json", json.dumps(config, indent=2) + "\n"))
        if self.report_prefix is not None:  # reports of this model that the new set does not have go
            new = {p.name for p in staged if p.parent == self.staging / "reports"}
            old = self.run_dir / "reports"
            if old.is_dir():
                self.remove += [f"reports/{p.name}" for p in sorted(old.glob(f"{self.report_prefix}*"))
                                if p.name not in new]
                if (old / "summary.json").exists() and "summary.json" not in new:
                    self.remove.append("reports/summary.json")  # it summarises the models this replaces
        for p in staged:
            fsync_file(p)
        journal = {"stage": self.stage, "staging": self.staging.name,
                   "renames": [[str(p.relative_to(self.run_dir)), str(self.final_path(p).relative_to(self.run_dir))]
                               for p in staged],
                   "remove": self.remove}
        tmp = self.run_dir / f"{JOURNAL}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(journal, indent=1), encoding="utf-8")
        fsync_file(tmp)
        return journal

    def _write(self, name: str, text: str) -> Path:
        path = self.staging / name
        path.write_text(text, encoding="utf-8")
        return path


