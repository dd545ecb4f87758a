"""Honest selection: models chosen on val (or train), test scored once for the chosen model, the table's headline."""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.metrics import format_results
from pipeline.selection import score_test
from tests.test_folders import make_layout

CPU = torch.device("cpu")


def test_score_test_predicts_once_on_test_only_and_scores_top1_and_mean_per_class():
    x = np.arange(12, dtype=np.float64).reshape(6, 2)
    inputs = SimpleNamespace(test=SimpleNamespace(features=x, labels=np.array([0, 0, 0, 0, 1, 1])))
    calls = []

    def proba(features):
        calls.append(features)
        return np.eye(2)[[0, 0, 0, 1, 1, 0]]  # 4 of 6 right; class 0: 3/4, class 1: 1/2

    out = score_test("head", inputs, proba, "val (best epoch)")
    assert len(calls) == 1 and calls[0].dtype == np.float32 and np.array_equal(calls[0], x)
    assert out == {"selected_on": "val (best epoch)", "test_acc": 4 / 6, "test_mean_per_class": 0.625, "n_test": 6}
    assert score_test("head", SimpleNamespace(test=None), proba, "val") == {"selected_on": "val", "test_acc": None}
    assert len(calls) == 1


def test_the_table_leads_with_test_when_there_is_one():
    metrics = {"extract": {"images": 20, "cache_hit": True, "seconds": 1.0, "leaked_images": 2},
               "head": {"val_acc": 0.9, "seconds": 2.0, "best_epoch": 3, "test_acc": 0.8, "test_mean_per_class": 0.75},
               "logistic": {"val_acc": 0.85, "seconds": 3.0, "C": 1.0, "selected_on": "train (3-fold cross-validation)",
                            "test_acc": 0.7, "test_mean_per_class": 0.65}}
    lines = format_results(metrics).splitlines()
    assert lines[0].split() == ["stage", "test_acc", "test_per_class", "val_acc", "seconds", "details"]
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert rows["head"][1:4] == ["0.8000", "0.7500", "0.9000"]
    assert rows["logistic"][1:4] == ["0.7000", "0.6500", "0.8500"]
    assert rows["extract"][1:3] == ["-", "-"] and "2 image(s) in more than one split" in lines[2]
    assert lines[-1].startswith("note: test_acc (top-1) and test_per_class") and "val_acc also chose head" in lines[-1]


def test_without_test_the_table_says_which_val_figures_also_chose_the_model():
    metrics = {"head": {"val_acc": 0.9, "seconds": 2.0, "best_epoch": 3, "test_acc": None},
               "logistic": {"val_acc": 0.85, "seconds": 3.0, "C": 1.0, "selected_on": "train (cv)"},
               "finetune": {"val_acc": 0.95, "seconds": 30.0, "best_epoch": 1}}
    text = format_results(metrics)
    assert text.splitlines()[0].split() == ["stage", "val_acc", "seconds", "details"]
    assert text.splitlines()[-1] == ("note: val_acc of head, finetune was also used for selection (no test split was "
                                     "scored), so optimistic: add a test/ folder (or data.test_fraction) for a "
                                     "figure nothing was chosen on")
    assert "note" not in format_results({"logistic": metrics["logistic"]})


@pytest.fixture
def with_and_without_test(tiny_cfg, tmp_path):
    root = make_layout(tmp_path / "with", n_train=6, n_val=3, n_test=3)
    bare = tmp_path / "without"
    shutil.copytree(root, bare)
    shutil.rmtree(bare / "test")
    extra = ("head.epochs=4", "head.lr=0.01", "extract.batch_size=1")  # the same features with and without test
    return tiny_cfg(f"data.root={root}", *extra), tiny_cfg(f"data.root={bare}", "run.name=bare",
                                                       f"extract.cache_dir={tmp_path / 'cache-bare'}", *extra)


def test_head_and_logistic_choose_without_test_and_score_it_once_after(with_and_without_test, monkeypatch):
    from pipeline import selection
    from pipeline.head import run_head
    from pipeline.logistic import run_logistic
    from pipeline.records import StageResult

    tested, bare = with_and_without_test
    calls = []
    real = selection.score_proba
    monkeypatch.setattr(selection, "score_proba", lambda y, p: calls.append(len(y)) or real(y, p))
    head, head_bare = run_head(tested, CPU), run_head(bare, CPU)
    logistic, logistic_bare = run_logistic(tested, CPU), run_logistic(bare, CPU)
    assert calls == [6, 6]  # once per stage, on the 6 test images; never without a test split
    # the choice (best epoch, C) and every val figure are the same as without test/: test chose nothing
    assert head["history"] == head_bare["history"] and head["best_epoch"] == head_bare["best_epoch"]
    assert logistic["C"] == logistic_bare["C"] and logistic["val_acc"] == logistic_bare["val_acc"]
    assert head_bare["test_acc"] is None and logistic_bare["test_acc"] is None
    # the recorded figure is the saved (chosen) head's accuracy on test
    from pipeline import cache as fc

    saved = torch.load(tested.run_dir / "head.pt", weights_only=False)
    layer = torch.nn.Linear(512, 2)
    layer.load_state_dict(saved["state_dict"])
    test = fc.open_cache(saved["cache_file"]).test
    with torch.no_grad():
        pred = layer(torch.from_numpy(test.features)).argmax(1).numpy()
    assert head["test_acc"] == float(np.mean(pred == test.labels)) and head["n_test"] == 6
    assert head["selected_on"] == "val (best epoch)" and logistic["selected_on"].startswith("train (")
    result = StageResult.from_dict("head", head)
    assert result.test_acc == head["test_acc"] and result.test_mean_per_class == head["test_mean_per_class"]
    assert StageResult.from_dict("head", result.to_dict()).to_dict() == result.to_dict()


def test_a_streamed_head_also_scores_test_once_with_the_kept_weights(tiny_cfg, tmp_path):
    """head.max_memory_gb below the cache's size: the head streams, and its kept epoch is still scored on
    test, once, streamed in file order, with the same figure the saved weights give on the test rows."""
    from pipeline import cache as fc
    from pipeline.head import run_head

    root = make_layout(tmp_path / "with", n_train=6, n_val=3, n_test=3)
    entry = run_head(tiny_cfg(f"data.root={root}", "head.epochs=3", "head.max_memory_gb=0.000001"), CPU)
    assert entry["streamed"] is True and entry["n_test"] == 6 and entry["selected_on"] == "val (best epoch)"
    saved = torch.load(entry["model_file"], weights_only=False)
    layer = torch.nn.Linear(512, 2)
    layer.load_state_dict(saved["state_dict"])
    test = fc.open_cache(saved["cache_file"]).test
    with torch.no_grad():
        pred = layer(torch.from_numpy(test.features)).argmax(1).numpy()
    assert entry["test_acc"] == float(np.mean(pred == test.labels))


def test_the_cli_table_leads_with_test_on_a_train_validation_test_folder(params_file, tmp_path, capsys):
    import run_pipeline
    from pipeline.metrics import read_metrics

    root = make_layout(tmp_path / "layout")
    assert run_pipeline.main(["--params", str(params_file), "--set", f"data.root={root}", "extract", "head",
                              "logistic"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("\nresults ("):].splitlines()[2:]
    assert table[0].split()[:3] == ["stage", "test_acc", "test_per_class"]
    metrics = read_metrics(tmp_path / "runs" / "t")
    rows = {line.split()[0]: line.split() for line in table[2:5]}
    for stage in ("head", "logistic"):
        entry = metrics[stage]
        assert entry["n_test"] == 4
        assert rows[stage][1:4] == [f"{entry['test_acc']:.4f}", f"{entry['test_mean_per_class']:.4f}",
                                    f"{entry['val_acc']:.4f}"]
    assert table[-1].startswith("note: test_acc (top-1)")


def test_the_memory_decision_counts_the_test_rows_too():
    from pipeline import stream

    shapes = {"train": (1000, 1280), "val": (200, 1280)}  # 5.86 MiB as float32
    with_test = {**shapes, "test": (300, 1280)}            # + 1.46 MiB, loaded with train and val
    assert stream.float32_nbytes(with_test) == 1500 * 1280 * 4
    assert stream.float32_nbytes(with_test, ("train",)) == 1000 * 1280 * 4
    assert not stream.needs_streaming(shapes, 6 / 1024) and stream.needs_streaming(with_test, 6 / 1024)


def test_the_table_says_the_head_is_the_sweep_winner_with_its_type_and_params():
    sweep = {"val_acc": 0.9, "seconds": 2.0, "source": "sweep", "head_type": "knn", "params": {"k": 5, "temperature": 0.07},
             "selected_on": "val (the sweep's winner)", "sweep": {"planned": 8, "finished": 8, "winner": "k=5"}}
    row = format_results({"head": sweep}).splitlines()[2]
    assert row.split()[:3] == ["head", "0.9000", "2.0"]
    assert row.endswith("sweep winner of 8 configurations: knn (k=5)")
    older = {**sweep, "best_epoch": 4, "epochs": 10, "sweep": {"finished": 3}}  # written before the label was kept
    assert format_results({"head": older}).splitlines()[2].endswith(
        "sweep winner of 3 configurations: knn (k=5, temperature=0.07), best_epoch=4, epochs=10")
    plain = {"val_acc": 0.9, "seconds": 2.0, "head_type": "linear", "best_epoch": 4, "epochs": 10}
    assert "sweep" not in format_results({"head": plain})
