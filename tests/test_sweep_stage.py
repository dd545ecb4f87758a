"""The sweep stage: the grid from one read of the cache, the winner as head.pt, Ctrl-C, kill -9 at every rename."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import run_pipeline
from pipeline import rundir
from pipeline.artifacts import SUMS_FILE, read_sums
from pipeline.fsutil import sha256_file
from pipeline.ledger import read_ledger
from pipeline.metrics import read_metrics
from pipeline.predictor import load_artifact, load_predictor
from tests import child
from tests.conftest import make_image_folder, tiny_overrides

CPU = torch.device("cpu")
GRID = {"linear": {"lr": [0.01, 0.1]}, "knn": {"k": [3, 5]}, "ncm": {}, "logistic": {"C": [0.1, 1.0]},
        "mlp": {"hidden": [8], "lr": [0.01]}}


def sets(overrides: list[str], *extra: str) -> list[str]:
    return [a for s in list(overrides) + list(extra) for a in ("--set", s)]


def grid_set(grid: dict) -> str:
    return f"sweep.grid={json.dumps(grid)}"


def val_features(run_dir: Path):
    from pipeline import cache as fc

    return fc.read_cache(read_metrics(run_dir)["extract"]["cache_file"]).val


def test_sweep_publishes_the_winner_as_the_head_and_reports_it(tmp_path, image_root, capsys):
    overrides = tiny_overrides(tmp_path, image_root)
    assert run_pipeline.main(sets(overrides, grid_set(GRID)) + ["sweep"]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "t"
    summary = json.loads((run_dir / "sweep.json").read_text())
    assert summary["planned"] == summary["finished"] == 8 and not summary["interrupted"]
    assert summary["grid"] == GRID and summary["has_test"] is False
    assert "sweep winner:" in out and "also used for selection" in out and "rank" in out
    assert f"sweep winner of 8 configurations: {summary['winner']['head_type']} (" in out[out.index("\nresults ("):]
    assert (run_dir / "sweep.md").read_text().startswith("# Sweep")
    assert not (run_dir / "sweep.png").exists()                   # report.enabled=false: `report` draws it
    winner = summary["winner"]
    entry = read_metrics(run_dir)["head"]
    assert entry["source"] == "sweep" and entry["head_type"] == winner["head_type"]
    assert entry["val_acc"] == winner["val_acc"] and "mean_per_class_acc" in entry
    artifact = load_artifact(run_dir, "head")                    # recorded in SHA256SUMS by the same publish
    assert artifact["sweep_winner"]["head_type"] == winner["head_type"]
    val = val_features(run_dir)
    probs = load_predictor(run_dir, "head", CPU, with_backbone=False).probs_from_features(val.features)
    assert np.mean(probs.argmax(1) == val.labels) == pytest.approx(winner["val_acc"])  # predict uses the winner
    rows = list(csv.DictReader((run_dir / "head_val_predictions.csv").open()))
    assert [r["path"] for r in rows] == list(val.paths) and set(rows[0]) >= {"true", "predicted", "probability", "top_k"}
    ledger = read_ledger(tmp_path / "runs" / "ledger.jsonl").entries
    assert len(ledger) == 8 and {e.source for e in ledger} == {"sweep"}
    assert {e.head_type for e in ledger} == set(GRID) and ledger[0].val_acc == winner["val_acc"]
    assert run_pipeline.main(sets(overrides) + ["report"]) == 0   # the report stage redraws the winner
    out = capsys.readouterr().out
    assert "report: head: val top-1" in out and f"report: sweep: 8 configurations drawn in {run_dir / 'sweep.png'}" in out
    assert (run_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_png_follows_report_enabled_and_report_redraws_it_from_sweep_json(tmp_path, image_root, capsys):
    overrides = tiny_overrides(tmp_path, image_root)
    grid = {"knn": {"k": [3, 5]}, "ncm": {}}
    assert run_pipeline.main(sets(overrides, grid_set(grid), "report.enabled=true") + ["sweep"]) == 0
    run_dir = tmp_path / "runs" / "t"
    assert (run_dir / "sweep.png").stat().st_size > 1000 and (run_dir / "reports").is_dir()
    drawn_by_sweep = (run_dir / "sweep.png").read_bytes()
    assert run_pipeline.main(sets(overrides) + ["report"]) == 0
    assert (run_dir / "sweep.png").read_bytes() == drawn_by_sweep     # sweep.json holds all the chart shows
    # a later sweep without reports takes the earlier sweep's chart away with the rest of its set
    assert run_pipeline.main(sets(overrides, grid_set({"ncm": {"temperature": [0.05, 0.1]}})) + ["sweep"]) == 0
    assert not (run_dir / "sweep.png").exists()
    assert str(run_dir / "sweep.png") not in read_metrics(run_dir)["head"]["sweep"]["files"]
    capsys.readouterr()
    assert run_pipeline.main(sets(overrides) + ["report"]) == 0
    assert "report: sweep: 2 configurations drawn" in capsys.readouterr().out
    drawn = (run_dir / "sweep.png").read_bytes()
    # head.sweep.files stays what the sweep wrote; the report's summary lists the chart it drew
    assert json.loads((run_dir / "reports" / "summary.json").read_text())["sweep"] == {"reports": [str(run_dir / "sweep.png")]}
    (run_dir / "sweep.json").write_text('{"results": [')              # damaged: named, the rest still redrawn
    assert run_pipeline.main(sets(overrides) + ["report"]) == 0
    out = capsys.readouterr().out
    assert f"report: {run_dir / 'sweep.json'} cannot be read (JSONDecodeError" in out and "run sweep again" in out
    assert "report: head: val top-1" in out and (run_dir / "sweep.png").read_bytes() == drawn
    summary = {"has_test": False, "interrupted": False, "seconds": 1.0, "planned": 1,
               "results": [{"head_type": "svm", "params": {}, "val_acc": 0.5, "val_mean_per_class": 0.5, "seconds": 1}]}
    (run_dir / "sweep.json").write_text(json.dumps(summary))          # parses, but not a sweep this version made
    assert run_pipeline.main(sets(overrides) + ["report"]) == 0
    out = capsys.readouterr().out
    assert "cannot be read (ValueError: result 1 has head type 'svm'" in out and "report: head: val top-1" in out
    assert (run_dir / "sweep.png").read_bytes() == drawn
    assert run_pipeline.main(sets(overrides) + ["head"]) == 0         # a plain head replaces the sweep's winner
    capsys.readouterr()
    assert run_pipeline.main(sets(overrides) + ["report"]) == 0
    assert "is an earlier sweep's (head.pt was trained since): sweep.png is not redrawn" in capsys.readouterr().out
    assert "sweep" not in json.loads((run_dir / "reports" / "summary.json").read_text())


def test_a_cache_over_head_max_memory_gb_is_refused_naming_the_budget(tmp_path, image_root, capsys):
    overrides = tiny_overrides(tmp_path, image_root)
    assert run_pipeline.main(sets(overrides, grid_set({"ncm": {}}), "head.max_memory_gb=0.000001") + ["sweep"]) == 2
    err = capsys.readouterr().err
    assert "head.max_memory_gb=1e-06" in err and "a sweep keeps the features in memory: raise head.max_memory_gb" in err
    assert not (tmp_path / "runs" / "t" / "sweep.json").exists()


def test_ctrl_c_before_any_configuration_finished_exits_130_and_writes_nothing(tmp_path, image_root, capsys,
                                                                             monkeypatch):
    from pipeline import sweep as sw

    def interrupted(*args):
        raise KeyboardInterrupt
        yield

    overrides = tiny_overrides(tmp_path, image_root)
    assert run_pipeline.main(sets(overrides) + ["extract"]) == 0
    monkeypatch.setattr(sw, "_run_unit", interrupted)
    capsys.readouterr()
    assert run_pipeline.main(sets(overrides, grid_set({"ncm": {}})) + ["sweep"]) == 130
    assert "sweep: interrupted before any configuration finished; nothing was written" in capsys.readouterr().err
    run_dir = tmp_path / "runs" / "t"
    assert not (run_dir / "sweep.json").exists() and not (run_dir / "head.pt").exists()
    assert "head" not in read_metrics(run_dir)


def test_a_bad_grid_names_the_parameter_before_any_extraction(tmp_path, image_root, capsys):
    overrides = tiny_overrides(tmp_path, image_root)
    assert run_pipeline.main(sets(overrides, grid_set({"knn": {"k": [0]}})) + ["sweep"]) == 2
    assert "error: sweep.grid.knn.k = 0: must be an integer > 0" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_ctrl_c_keeps_the_configurations_already_finished(tmp_path, image_root, monkeypatch, capsys):
    import pipeline.sweep as sw

    units, run_unit = [], sw._run_unit

    def interrupted_second_unit(unit, *args):
        units.append(unit)
        if len(units) == 2:
            raise KeyboardInterrupt
        yield from run_unit(unit, *args)

    monkeypatch.setattr(sw, "_run_unit", interrupted_second_unit)
    grid = {"linear": {"lr": [0.01, 0.1]}, "knn": {"k": [3]}, "ncm": {}, "mlp": {"hidden": [8]}}
    assert run_pipeline.main(sets(tiny_overrides(tmp_path, image_root), grid_set(grid)) + ["sweep"]) == 130
    assert "sweep: interrupted: 2 of 5 configurations finished" in capsys.readouterr().err
    run_dir = tmp_path / "runs" / "t"
    summary = json.loads((run_dir / "sweep.json").read_text())
    assert summary["interrupted"] and summary["finished"] == 2 and summary["winner"]["head_type"] == "linear"
    assert read_metrics(run_dir)["head"]["sweep"]["finished"] == 2 and load_artifact(run_dir, "head")
    assert len(read_ledger(tmp_path / "runs" / "ledger.jsonl").entries) == 2


def test_a_test_split_is_scored_once_for_the_winner_and_is_the_headline(tmp_path, image_root, monkeypatch, capsys):
    """A cache with a test split (here the val rows again, relabelled): selection cannot see it."""
    from pipeline import cache as fc
    from pipeline.orchestrate import StageFeatures

    load = StageFeatures.load

    def with_test(self):
        features = load(self)
        val = features.splits["val"]
        features.splits["test"] = fc.CachedSplit(val.features, 1 - val.labels, list(val.paths))
        return features

    monkeypatch.setattr(StageFeatures, "load", with_test)
    grid = {"logistic": {"C": [0.1]}, "ncm": {}}   # a logistic winner is saved folded into an nn.Linear
    assert run_pipeline.main(sets(tiny_overrides(tmp_path, image_root), grid_set(grid)) + ["sweep"]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "t"
    entry, summary = read_metrics(run_dir)["head"], json.loads((run_dir / "sweep.json").read_text())
    assert summary["has_test"] and entry["head_type"] == "logistic" and entry["val_acc"] == 1.0
    assert entry["test_acc"] == 0.0 and summary["winner"]["test_acc"] == 0.0  # the labels it never saw are flipped
    assert "sweep winner: logistic C=0.1: test top-1 0.0000" in out and "selected on val only" in out
    val = val_features(run_dir)
    probs = load_predictor(run_dir, "head", CPU, with_backbone=False).probs_from_features(val.features)
    assert np.mean(probs.argmax(1) == val.labels) == 1.0


def test_a_logistic_winner_folds_into_a_linear_layer_with_the_same_probabilities():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.sweep_stage import fold_logistic

    rng = np.random.default_rng(0)
    for classes, present in ((2, [0, 1]), (4, [0, 1, 2, 3]), (4, [0, 2, 3])):   # binary, multinomial, a class absent
        y = rng.choice(present, 60)
        x = (rng.normal(size=(60, 5)) + y[:, None] + rng.normal(size=5) * 4).astype(np.float32)
        model = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(C=0.5))]).fit(x, y)
        state = fold_logistic(model, classes)
        head = torch.nn.Linear(5, classes)
        head.load_state_dict(state)
        folded = torch.softmax(head(torch.from_numpy(x)), 1).detach().numpy()
        expected = np.zeros((60, classes))
        expected[:, model.classes_] = model.predict_proba(x)
        np.testing.assert_allclose(folded, expected, atol=1e-5)


# ----------------------------------------------------------------------------- kill -9 at every rename
@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A run folder whose head came from the head stage: the old complete set."""
    tmp = tmp_path_factory.mktemp("sweepcrash")
    root = make_image_folder(tmp / "imgs", n_train=4, n_val=2)
    overrides = tiny_overrides(tmp, root) + ["run.num_threads=1", "head.epochs=2"]
    out = tmp / "template.out"
    p = child.start(child.run_cli, sets(overrides, "run.name=template") + ["head"], str(out))
    p.join(300)
    assert p.exitcode == 0, out.read_text()
    return {"tmp": tmp, "overrides": overrides, "runs": tmp / "runs"}


def sweep_state(run_dir: Path, grid: dict) -> str:
    """Assert one complete, consistent set after the next run's roll-forward; 'old' (the head stage's) or 'new'."""
    with rundir.run_lock(run_dir):
        pass
    assert not [n for n in os.listdir(run_dir) if n.startswith((".stage-", ".publish.json")) or n.endswith(".tmp")]
    metrics, config = read_metrics(run_dir), json.loads((run_dir / "config.json").read_text())
    assert read_sums(run_dir / SUMS_FILE)["head.pt"] == sha256_file(run_dir / "head.pt") == metrics["head"]["model_sha256"]
    artifact = load_artifact(run_dir, "head")
    assert (run_dir / "head_val_predictions.csv").is_file()
    if metrics["head"].get("source") != "sweep":
        assert "sweep_winner" not in artifact and not (run_dir / "sweep.json").exists()
        assert config["sweep"]["grid"] != grid
        return "old"
    summary = json.loads((run_dir / "sweep.json").read_text())
    assert artifact["sweep_winner"]["head_type"] == summary["winner"]["head_type"] == metrics["head"]["head_type"]
    assert config["sweep"]["grid"] == summary["grid"] == grid and not (run_dir / "sweep.png").exists()  # reports off
    return "new"


def test_kill_9_at_every_rename_of_the_sweep_publish_leaves_the_old_or_the_new_set(template):
    grid = {"linear": {"lr": [0.01, 0.1]}, "ncm": {}}
    assert sweep_state(template["runs"] / "template", grid) == "old"
    outcomes = []
    for k in range(1, 30):
        run_dir = template["runs"] / f"k{k}"
        shutil.copytree(template["runs"] / "template", run_dir)
        out = template["tmp"] / f"k{k}.out"
        p = child.start(child.run_cli_killed_at_rename, sets(template["overrides"], f"run.name=k{k}", grid_set(grid))
                        + ["sweep"], str(out), k)
        p.join(120)
        if p.exitcode == 0:  # k is past the last rename: the publish completed
            assert sweep_state(run_dir, grid) == "new"
            break
        assert p.exitcode == -signal.SIGKILL, out.read_text()
        outcomes.append(sweep_state(run_dir, grid))
    # Killed at the journal's rename (the commit point): the old set; at any later rename: rolled forward.
    assert outcomes == ["old"] + ["new"] * (len(outcomes) - 1) and len(outcomes) >= 8, outcomes
