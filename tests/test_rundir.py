"""The run folder: one lock, each stage's outputs published as one unit, kill -9 at every rename.

A baseline run (head, logistic, finetune, reports) is the "old complete set"; each test copies it
into a fresh run folder and changes one stage's settings, so "old" and "new" are told apart by the
config recorded with the model.
"""
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

import run_pipeline
from pipeline import rundir
from pipeline.artifacts import MODEL_FILES, SUMS_FILE, read_sums
from pipeline.fsutil import sha256_file
from pipeline.metrics import read_metrics
from pipeline.predictor import load_artifact
from tests import child
from tests.conftest import make_image_folder, tiny_overrides

SECTION_OF = {"head": "head_config", "logistic": "logistic_config", "finetune": "finetune_config"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rundir")
    root = make_image_folder(tmp / "imgs", n_train=4, n_val=2)
    overrides = tiny_overrides(tmp, root) + ["run.num_threads=1", "head.epochs=2", "report.grid_images=4"]
    out = tmp / "template.out"
    p = child.start(child.run_cli, sets(overrides, "template", ["report.enabled=true"])
                    + ["head", "logistic", "finetune"], str(out))
    p.join(300)
    assert p.exitcode == 0, out.read_text()
    return {"tmp": tmp, "root": root, "overrides": overrides, "runs": tmp / "runs"}


def sets(overrides: list[str], name: str, extra: list[str]) -> list[str]:
    return [a for s in overrides + [f"run.name={name}"] + extra for a in ("--set", s)]


def fresh(base, name: str) -> Path:
    """A copy of the baseline run folder: the old complete set."""
    run_dir = base["runs"] / name
    shutil.copytree(base["runs"] / "template", run_dir)
    return run_dir


def state(run_dir: Path, stage: str) -> dict:
    """Assert the run folder holds one complete, consistent set; return the stage's recorded config.

    First what the next run does on taking the lock: roll an interrupted publish forward, remove
    the dead writer's staging folder and temporary files.
    """
    with rundir.run_lock(run_dir):
        pass
    leftovers = [n for n in os.listdir(run_dir) if n.startswith((".stage-", ".publish.json")) or n.endswith(".tmp")]
    assert not leftovers
    sums = read_sums(run_dir / SUMS_FILE)
    metrics = read_metrics(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    for kind, name in MODEL_FILES.items():  # every model is the one its records describe
        assert sums[name] == sha256_file(run_dir / name) == metrics[kind]["model_sha256"], kind
        for report in metrics[kind].get("reports", []):
            assert Path(report).is_file(), report
        if metrics[kind].get("reports"):
            summary = json.loads((run_dir / "reports" / f"{kind}_classification_report.json").read_text())
            assert summary["val_acc_top1"] == metrics[kind]["val_acc_top1"], kind
        else:
            assert not list((run_dir / "reports").glob(f"{kind}_*")), kind  # no reports of another model
    artifact = load_artifact(run_dir, stage)  # verifies the recorded SHA-256
    recorded = {k: v for k, v in artifact[SECTION_OF[stage]].items() if k != "resume"}  # how it started
    assert recorded == {k: v for k, v in config[stage].items() if k != "resume"}  # config.json describes it
    return recorded


CHANGES = {"head": ["head.lr=0.05", "report.enabled=true"], "logistic": ["logistic.c_grid=[0.5, 2.0]"],
           "finetune": ["finetune.lr=0.05"]}


@pytest.mark.parametrize("stage", ["head", "logistic", "finetune"])
def test_kill_9_at_every_rename_of_the_publish_leaves_the_old_or_the_new_set(base, stage):
    old = state(base["runs"] / "template", stage)
    outcomes = []
    for k in range(1, 30):
        run_dir = fresh(base, f"{stage}-k{k}")
        out = base["tmp"] / f"{stage}-k{k}.out"
        p = child.start(child.run_cli_killed_at_rename, sets(base["overrides"], run_dir.name, CHANGES[stage])
                        + [stage], str(out), k)
        p.join(120)
        if p.exitcode == 0:  # k is past the last rename: the publish completed
            assert state(run_dir, stage) != old
            break
        assert p.exitcode == -signal.SIGKILL, out.read_text()
        outcomes.append("old" if state(run_dir, stage) == old else "new")
    # Killed at the journal's rename (the commit point): the old set; at any later rename: rolled forward.
    assert outcomes == ["old"] + ["new"] * (len(outcomes) - 1) and len(outcomes) >= 5, outcomes


def test_interrupted_finetune_keeps_the_complete_model_and_resumes_from_its_best_so_far(base):
    run_dir = fresh(base, "ft-interrupted")
    old_sha, old_entry = sha256_file(run_dir / "finetune.pt"), read_metrics(run_dir)["finetune"]
    old_lr = state(run_dir, "finetune")["lr"]
    best = run_dir / "finetune.best-so-far.pt"
    out = base["tmp"] / "ft-interrupted.out"
    change = ["finetune.lr=0.05", "finetune.epochs=3"]
    p = child.start(child.run_cli, sets(base["overrides"], run_dir.name, change) + ["finetune"], str(out))
    deadline = time.monotonic() + 120
    while not best.exists():  # epoch 1 ended and was kept as the best so far
        assert p.is_alive() and time.monotonic() < deadline, out.read_text()
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    assert state(run_dir, "finetune")["lr"] == old_lr != 0.05  # predict and report still get the last complete model
    assert sha256_file(run_dir / "finetune.pt") == old_sha and read_metrics(run_dir)["finetune"] == old_entry
    assert torch.load(best, weights_only=True)["epoch"] >= 1  # kept beside it, named as such, complete
    out = base["tmp"] / "ft-resumed.out"
    p = child.start(child.run_cli, sets(base["overrides"], run_dir.name, change + ["finetune.resume=true"])
                    + ["finetune"], str(out))
    p.join(120)
    assert p.exitcode == 0, out.read_text()
    entry = read_metrics(run_dir)["finetune"]
    assert entry["resumed_from_epoch"] >= 1 and [h["epoch"] for h in entry["history"]] == [1, 2, 3]
    assert "finetune: resuming from the best epoch so far" in out.read_text()
    assert state(run_dir, "finetune")["lr"] == 0.05 and not best.exists()
    assert best.name not in read_sums(run_dir / SUMS_FILE)


def test_two_runs_in_one_run_folder_take_turns(base):
    run_dir = fresh(base, "two")
    out_a, out_b = base["tmp"] / "two-a.out", base["tmp"] / "two-b.out"
    # The first one extracts into its own cache, slowly, so that the second surely finds the folder in use.
    a = child.start(child.run_cli, sets(base["overrides"], "two", ["head.lr=0.05", f"extract.cache_dir="
                                                                   f"{base['tmp'] / 'slow-cache'}"]) + ["head"],
                    str(out_a), str(base["tmp"] / "two-a.log"), False, 1.0)
    deadline = time.monotonic() + 60
    while not (run_dir / ".run.lock").read_text().strip() == str(a.pid):
        assert a.is_alive() and time.monotonic() < deadline, out_a.read_text()
        time.sleep(0.005)
    b = child.start(child.run_cli, sets(base["overrides"], "two", ["head.lr=0.2"]) + ["head"], str(out_b))
    a.join(120)
    b.join(120)
    assert a.exitcode == 0 and b.exitcode == 0, out_b.read_text()
    assert f"is in use by pid {a.pid}; waiting for it to finish" in out_b.read_text()
    assert state(run_dir, "head")["lr"] == 0.2  # all of the second run's set, none of the first's


def test_failed_run_leaves_config_json_as_it_was(base, capsys):
    run_dir = fresh(base, "cfg")
    before = (run_dir / "config.json").read_bytes()
    assert run_pipeline.main(sets(base["overrides"], "cfg", ["head.lr=0.5", "data.root=/nonexistent"])
                             + ["head"]) == 2
    assert "error: " in capsys.readouterr().err
    assert (run_dir / "config.json").read_bytes() == before  # it still describes the models beside it
    state(run_dir, "head")


DAMAGE = {"truncated": b'{"head": {"val_acc": 0.5', "a list": b"[1, 2]", "random bytes": os.urandom(64),
          "not UTF-8": b"\xff\xfe"}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("record", ["metrics.json", "SHA256SUMS"])
def test_damaged_record_is_one_line_before_any_work(base, record, damage, capsys):
    run_dir = fresh(base, f"damaged-{record}-{damage.replace(' ', '-')}")
    (run_dir / record).write_bytes(DAMAGE[damage])
    model = (run_dir / "head.pt").read_bytes()
    assert run_pipeline.main(sets(base["overrides"], run_dir.name, []) + ["head"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: '{run_dir / record}' is damaged") and err.count("\n") == 1, err
    assert "move it away" in err or "restore it" in err
    assert (run_dir / "head.pt").read_bytes() == model and (run_dir / record).read_bytes() == DAMAGE[damage]


def test_leftover_temporary_files_of_dead_processes_are_removed(base):
    run_dir = fresh(base, "leftovers")
    dead = child.start(os.getpid)
    dead.join()
    (run_dir / f".config.json.{dead.pid}.tmp").write_text("{")
    (run_dir / f".stage-head.{dead.pid}.tmp").mkdir()
    (run_dir / "reports" / f".head_confusion_matrix.png.{dead.pid}.tmp").write_bytes(b"\x89PNG")
    mine = run_dir / f".config.json.{os.getpid()}.tmp"  # a live process's work is left alone
    mine.write_text("{")
    with rundir.run_lock(run_dir):
        pass
    assert sorted(p.name for p in run_dir.rglob("*.tmp")) == [mine.name]


def test_other_data_in_a_run_folder_stops_naming_run_name(base, tmp_path, capsys):
    run_dir = fresh(base, "other-data")
    other = make_image_folder(tmp_path / "flowers", classes=("daisy", "rose", "tulip"), n_train=2, n_val=1)
    before = sorted(p.name for p in run_dir.iterdir())
    assert run_pipeline.main(sets(base["overrides"], "other-data", [f"data.root={other}"]) + ["head"]) == 2
    err = capsys.readouterr().err
    assert f"holds results on data.root '{base['root']}'" in err and "--set run.name=flowers" in err
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing of the other data mixed in


@pytest.mark.parametrize("where", ["model", "records"])
def test_full_disk_is_one_line_and_changes_nothing(base, monkeypatch, capsys, where):
    """torch.save on a full disk raises RuntimeError ('unexpected pos'); a record write raises ENOSPC."""
    import errno

    run_dir = fresh(base, f"full-{where}")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and not p.name.endswith(".lock")}
    if where == "model":
        def full(*a, **k):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0")
        monkeypatch.setattr(torch, "save", full)
    else:
        def full(self, name, text):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(rundir.Publication, "_write", full)
    assert run_pipeline.main(sets(base["overrides"], run_dir.name, ["head.lr=0.05"]) + ["head"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "free disk space" in err and "Traceback" not in err, err
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and not p.name.endswith(".lock")}
    assert after == before and not list(run_dir.glob(".stage-*"))
