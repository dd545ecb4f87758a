"""Sweeps: grid expansion and its errors, joint linear heads, selection on val only, reports."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.probes import build_probe, fit_module
from pipeline.sweep import JOINT_NOTE, NO_TEST_NOTE, TEST_NOTE, SweepError, expand_grid, run_sweep
from pipeline.sweep_report import (format_leaderboard, format_markdown, interval_note, notes, outcome_from_summary,
                                   sweep_summary, write_sweep_reports)

ISSUE_GRID = {"linear": {"lr": [1e-3, 3e-3, 1e-2, 3e-2], "weight_decay": [0, 1e-4, 1e-3]}, "knn": {"k": [5, 10, 20, 50]},
              "ncm": {}, "logistic": {"C": [0.01, 0.1, 1, 10]}, "mlp": {"hidden": [512], "lr": [1e-3]}}
SMALL_GRID = {"linear": {"lr": [0.01, 0.1], "weight_decay": [0, 1e-3], "epochs": 3, "batch_size": 8},
              "knn": {"k": [3, 5]}, "ncm": {}, "logistic": {"C": [0.1, 1.0]},
              "mlp": {"hidden": [8], "epochs": [3], "batch_size": [8], "lr": [0.05]}}


def blobs(n_per_class, seed, spread=1.2):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(0, 2, (3, 6))
    y = np.repeat(np.arange(3), n_per_class)
    return (centres[y] + rng.normal(0, spread, (len(y), 6))).astype(np.float32), y


@pytest.fixture(scope="module")
def data():
    return blobs(15, 1), blobs(8, 2), blobs(8, 3)


def test_the_issues_grid_expands_to_every_combination():
    configs = expand_grid(ISSUE_GRID)
    kinds = [c.head_type for c in configs]
    assert len(configs) == 12 + 4 + 1 + 4 + 1
    assert kinds.count("linear") == 12 and kinds.count("knn") == 4 and kinds.count("ncm") == 1
    assert configs[0].label() == "lr=0.001, weight_decay=0" and configs[16].label() == "defaults"
    assert expand_grid({"knn": {"k": 5}})[0].param_dict == {"k": 5}           # a scalar is one value
    assert len(expand_grid({"knn": {"k": [5, 5]}})) == 1                      # duplicates run once


@pytest.mark.parametrize("grid,needle", [
    ({"svm": {}}, "sweep.grid has unknown head type 'svm' (use: linear, mlp, knn, ncm, logistic)"),
    ({"knn": {"kk": [1]}}, "sweep.grid.knn has unknown parameter 'kk' (allowed: k, temperature)"),
    ({"logistic": {"c": [1]}}, "sweep.grid.logistic has unknown parameter 'c' (allowed: C, max_iter)"),
    ({"linear": {"lr": []}}, "sweep.grid.linear.lr is an empty list"),
    ({"linear": {"lr": [0.1, -1]}}, "sweep.grid.linear.lr = -1: must be a number > 0"),
    ({"logistic": {"C": [0]}}, "sweep.grid.logistic.C = 0: must be a number > 0"),
    ({"ncm": []}, "sweep.grid.ncm must be an object"),
    ({}, "sweep.grid must be a non-empty object"),
])
def test_bad_grids_name_what_is_wrong(grid, needle):
    with pytest.raises(SweepError) as err:
        expand_grid(grid)
    assert needle in str(err.value)


def test_sweep_trains_everything_and_linear_heads_jointly(data):
    (X, y), (Xv, yv), _ = data
    seen = []
    outcome = run_sweep(expand_grid(SMALL_GRID), X, y, Xv, yv, on_result=seen.append)
    assert len(outcome.results) == outcome.planned == 10 and not outcome.interrupted
    assert [r.config for r in seen] == [r.config for r in outcome.results]
    linear = [r for r in outcome.results if r.head_type == "linear"]
    # the linear heads train jointly, the two kNN share one search; the lone NCM and MLP and logistic do not
    assert all(r.joint for r in linear) and {r.head_type for r in outcome.results if r.joint} == {"linear", "knn"}
    for r in outcome.results:  # each kNN / NCM / MLP of a group scores as its probe alone
        if r.head_type in ("knn", "ncm", "mlp"):
            alone = build_probe(r.head_type, r.config.param_dict).fit(X, y, Xv, yv)
            np.testing.assert_allclose(r.model.predict_proba(Xv), alone.predict_proba(Xv), rtol=1e-5, atol=1e-6)
            assert r.val_acc == pytest.approx((alone.predict(Xv) == yv).mean())
    for r in linear:    # each jointly trained head scores like the same head trained alone (autograd loop)
        alone = build_probe("linear", r.config.param_dict)
        alone.trainer = lambda: fit_module
        alone.fit(X, y, Xv, yv)
        assert r.val_acc == pytest.approx(alone.result.best_acc) and r.best_epoch == alone.result.best_epoch
    ranked = outcome.ranked()
    assert ranked[0] is outcome.winner
    assert [r.val_acc for r in ranked] == sorted((r.val_acc for r in ranked), reverse=True)
    assert all(r.test_acc is None for r in outcome.results)
    text = format_leaderboard(outcome)
    assert NO_TEST_NOTE in text and JOINT_NOTE in text and "test top-1" not in text
    assert text.splitlines()[0].startswith(f"sweep winner: {outcome.winner.head_type}")


def test_test_split_is_scored_after_selection_for_the_chosen_only(data):
    (X, y), (Xv, yv), (Xt, yt) = data
    configs = expand_grid(SMALL_GRID)
    honest = run_sweep(configs, X, y, Xv, yv, Xt, yt)
    scrambled = run_sweep(configs, X, y, Xv, yv, Xt, (yt + 1) % 3)     # test labels cannot change any choice
    key = [(r.config, r.val_acc) for r in honest.ranked()]
    assert key == [(r.config, r.val_acc) for r in scrambled.ranked()]
    chosen = {r.config for r in honest.chosen()}
    assert honest.winner.config in chosen and {r.head_type for r in honest.chosen()} == set(SMALL_GRID)
    for r in honest.results:
        assert (r.test_acc is not None) == (r.config in chosen)
    w = honest.winner
    assert w.test_acc == pytest.approx((w.model.predict_proba(Xt).argmax(1) == yt).mean())
    assert scrambled.winner.test_acc != w.test_acc
    text = format_leaderboard(honest)
    assert TEST_NOTE in text and "test top-1" in text and f"test top-1 {w.test_acc:.4f}" in text.splitlines()[0]


def test_the_leaderboard_says_how_many_configurations_the_winners_interval_holds(data):
    from pipeline.analysis import wilson_interval

    (X, y), (Xv, yv), (Xt, yt) = data
    outcome = run_sweep(expand_grid(SMALL_GRID), X, y, Xv, yv, Xt, yt)
    assert (outcome.n_val, outcome.n_test) == (len(yv), len(yt))
    w, ranked = outcome.winner, outcome.ranked()
    lo, hi = wilson_interval(w.val_acc, len(yv))
    inside = sum(lo <= r.val_acc <= hi for r in ranked[1:])                 # brute force over the others
    note = interval_note(outcome)
    assert note.startswith(f"val has {len(yv)} images (one is {1 / len(yv):.4f} of top-1): the winner's 95% "
                           f"interval is {lo:.4f}-{hi:.4f} (Wilson) and {inside} of the other {len(ranked) - 1} ")
    t_lo, t_hi = wilson_interval(w.test_acc, len(yt))
    assert note.endswith(f"test has {len(yt)} images: the winner's test top-1 {w.test_acc:.4f} has a 95% interval of "
                         f"{t_lo:.4f}-{t_hi:.4f}")
    assert note in format_leaderboard(outcome) and note in format_markdown(outcome)
    old = sweep_summary(outcome)
    del old["n_val"], old["n_test"]                                        # a sweep.json from before the fields
    assert interval_note(outcome_from_summary(old)) is None and notes(outcome_from_summary(old))


def test_ctrl_c_keeps_the_finished_configurations(data):
    (X, y), (Xv, yv), _ = data

    def stop_after_five(result):
        if len(kept) == 4:
            raise KeyboardInterrupt
        kept.append(result)

    kept = []
    outcome = run_sweep(expand_grid(SMALL_GRID), X, y, Xv, yv, on_result=stop_after_five)
    assert outcome.interrupted and len(outcome.results) == 5 and outcome.planned == 10
    assert "interrupted: 5 of 10 configurations finished" in format_leaderboard(outcome)


def test_reports_are_written_whole(data, tmp_path):
    (X, y), (Xv, yv), (Xt, yt) = data
    outcome = run_sweep(expand_grid({"knn": {"k": [1, 3]}, "ncm": {}}), X, y, Xv, yv, Xt, yt)
    paths = write_sweep_reports(outcome, tmp_path / "run", grid={"knn": {"k": [1, 3]}, "ncm": {}})
    assert [p.name for p in paths] == ["sweep.json", "sweep.md", "sweep.png"]
    summary = json.loads(paths[0].read_text())
    assert summary["selection"] == "val" and summary["has_test"] and summary["finished"] == 3
    assert [r["rank"] for r in summary["results"]] == [1, 2, 3]
    assert summary["winner"]["params"] == outcome.winner.config.param_dict
    assert summary["winner"]["test_acc"] == pytest.approx(outcome.winner.test_acc)
    md = paths[1].read_text()
    assert md == format_markdown(outcome) and "| rank | head | params |" in md and TEST_NOTE in md
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[2].stat().st_size > 5000
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["sweep.json", "sweep.md", "sweep.png"]
    again = outcome_from_summary(summary)                         # what `report` redraws sweep.png from
    assert [(r.head_type, r.config.label(), r.val_acc, r.test_acc) for r in again.ranked()] == \
        [(r.head_type, r.config.label(), r.val_acc, r.test_acc) for r in outcome.ranked()]
    assert [r.config for r in again.chosen()] == [r.config for r in outcome.chosen()]
    assert notes(again) == notes(outcome) and again.has_test and again.planned == outcome.planned
    assert (again.n_val, again.n_test) == (outcome.n_val, outcome.n_test) == (len(yv), len(yt))


def test_warm_started_logistic_path_matches_a_cold_fit_per_c(data):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (X, y), (Xv, yv), _ = data
    outcome = run_sweep(expand_grid({"logistic": {"C": [10.0, 0.01, 1.0]}}), X, y, Xv, yv)
    assert [r.config.param_dict["C"] for r in outcome.results] == [0.01, 1.0, 10.0]   # the path runs C ascending
    for r in outcome.results:
        cold = make_pipeline(StandardScaler(), LogisticRegression(C=r.config.param_dict["C"], max_iter=1000)).fit(X, y)
        np.testing.assert_allclose(r.model.predict_proba(Xv), cold.predict_proba(Xv), atol=1e-2)  # lbfgs tol
        assert r.val_acc == pytest.approx((cold.predict(Xv) == yv).mean())
    assert outcome.ranked()[0].position <= 2 and {r.position for r in outcome.results} == {0, 1, 2}


def test_the_sweeps_mlps_on_lazy_windows_score_like_the_autograd_loop(data):
    """A sweep's mlp configurations (dropout 0: lazy_sgd's windows for the hidden layer) get the val top-1,
    best epoch and weights of the same mlp trained by fit_module (autograd, the SGD update)."""
    (X, y), (Xv, yv), _ = data
    grid = {"mlp": {"hidden": [8, 16], "epochs": [4], "batch_size": [4], "lr": [0.05], "weight_decay": [1e-3]}}
    outcome = run_sweep(expand_grid(grid), X, y, Xv, yv)
    assert len(outcome.results) == 2
    for r in outcome.results:
        alone = build_probe("mlp", r.config.param_dict)
        alone.trainer = lambda: fit_module
        alone.fit(X, y, Xv, yv)
        assert r.val_acc == pytest.approx(alone.result.best_acc) and r.best_epoch == alone.result.best_epoch
        for k, v in alone.model.state_dict().items():
            np.testing.assert_allclose(r.model.model.state_dict()[k].numpy(), v.numpy(), rtol=1e-4, atol=1e-5)


# One fresh interpreter imports the head cores (torch, not scikit-learn), says which of the libraries they
# must not need they imported, then forks a child per sweep case: one interpreter's start-up, not four.
FRESH_INTERPRETER = """
import json, os, sys
import numpy as np
import pipeline.probes, pipeline.joint, pipeline.sweep, pipeline.sweep_report, pipeline.analysis
cores = sorted(m for m in ('sklearn', 'matplotlib', 'torchvision') if m in sys.modules)
from pipeline import logistic_worker
from pipeline.sweep import expand_grid, run_sweep
X, y = np.random.default_rng(0).normal(size=(30, 4)).astype('float32'), np.arange(30) % 3
results = []
for grid, mode in {cases!r}:
    sys.stdout.flush()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        logistic_worker.WORKER = mode
        out = run_sweep(expand_grid(grid), X, y, X, y)
        os.write(write, json.dumps([len(out.results), 'sklearn' in sys.modules]).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    results.append(json.loads(text) if text else 'child died')
print(json.dumps({{"cores": cores, "sweeps": results}}))
"""
WITH_LOGISTIC = {"ncm": {}, "logistic": {"C": [1.0]}}
SWEEP_CASES = [({"knn": {"k": [1, 3]}, "ncm": {}}, "auto"), (WITH_LOGISTIC, "off"), (WITH_LOGISTIC, "on")]


@pytest.fixture(scope="module")
def fresh_interpreter() -> dict:
    out = subprocess.run([sys.executable, "-c", FRESH_INTERPRETER.format(cases=SWEEP_CASES)], capture_output=True,
                         text=True, check=True)
    return {"stderr": out.stderr, **json.loads(out.stdout.strip().splitlines()[-1])}


def test_the_cores_import_no_sklearn_matplotlib_or_torchvision(fresh_interpreter):
    assert fresh_interpreter["cores"] == [] and fresh_interpreter["stderr"] == ""


def test_scikit_learn_is_imported_only_for_a_grid_with_logistic_configs(fresh_interpreter):
    """The sweep imports scikit-learn only when it will use it (the knn + ncm grid: no; logistic fitted here:
    yes), and not at all when its child process fits the logistic configs (pipeline/logistic_worker.py)."""
    assert fresh_interpreter["sweeps"] == [[3, False], [2, True], [2, False]]


def test_a_sweep_without_val_rows_says_val_chooses(data):
    from pipeline.sweep import SweepError

    (X, y), (Xv, yv), _ = data
    with pytest.raises(SweepError, match="a sweep needs val rows: they choose the best epochs, C and the winner"):
        run_sweep(expand_grid({"ncm": {}}), X, y, Xv[:0], yv[:0])


def test_mlps_with_and_without_dropout_train_as_one_group(data):
    (X, y), (Xv, yv), _ = data
    grid = {"mlp": {"hidden": [4, 8], "dropout": [0.0, 0.3], "epochs": 3, "batch_size": 8, "lr": 0.05}}
    outcome = run_sweep(expand_grid(grid), X, y, Xv, yv, seed=2)
    assert len(outcome.results) == 4 and all(r.joint for r in outcome.results)
    assert len({r.seconds for r in outcome.results}) == 1                    # an even share of one run
    for r in outcome.results:
        alone = build_probe("mlp", r.config.param_dict, seed=2).fit(X, y, Xv, yv)
        assert r.best_epoch == alone.result.best_epoch
        np.testing.assert_allclose(r.model.predict_proba(Xv), alone.predict_proba(Xv), rtol=1e-4, atol=1e-5)


def test_the_logistic_child_process_gives_the_results_fitted_here(data, monkeypatch):
    """pipeline/logistic_worker.py: the C path fitted in a child process scores val and test, folds and
    predicts exactly as when fitted in this process; its pipeline is unpickled only when asked for."""
    from pipeline import logistic_worker

    (X, y), (Xv, yv), (Xt, yt) = data
    grid = {"logistic": {"C": [0.1, 1.0]}, "ncm": {}}
    outcomes = {}
    for mode in ("off", "on"):
        monkeypatch.setattr(logistic_worker, "WORKER", mode)
        outcomes[mode] = run_sweep(expand_grid(grid), X, y, Xv, yv, Xt, yt)
    here, child = ({r.config: r for r in outcomes[m].results if r.head_type == "logistic"} for m in ("off", "on"))
    assert len(here) == len(child) == 2
    for config, r in child.items():
        assert r.model._model is None                                       # not unpickled for val and test
        assert (r.val_acc, r.val_mean_per_class, r.test_acc) == (here[config].val_acc, here[config].val_mean_per_class,
                                                                   here[config].test_acc)
        for a, b in zip(r.model.folded(), here[config].model.folded()):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(r.model.predict_proba(Xv), here[config].model.predict_proba(Xv))
        assert r.model._model is None
        np.testing.assert_array_equal(r.model.predict_proba(X[:5] + 1), here[config].model.predict_proba(X[:5] + 1))
        assert r.model.model.named_steps["clf"].C == config.param_dict["C"]


def test_a_failed_or_interrupted_logistic_child_leaves_nothing_behind(data, monkeypatch, tmp_path, capsys):
    """A child that cannot run: the configs are fitted here, with the same results and nothing printed.
    Ctrl-C before the logistic unit: the child is stopped and its payload file removed."""
    import tempfile

    import pipeline.sweep as sw
    from pipeline import logistic_worker

    (X, y), (Xv, yv), _ = data
    grid = {"logistic": {"C": [0.1, 1.0]}, "ncm": {}}
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(logistic_worker, "WORKER", "off")
    want = [(r.config, r.val_acc) for r in run_sweep(expand_grid(grid), X, y, Xv, yv).results]
    monkeypatch.setattr(logistic_worker, "WORKER", "on")
    for python in ("/bin/false", str(tmp_path / "no-python")):            # exits at once, status 1; cannot start
        monkeypatch.setattr(sys, "executable", python)
        assert [(r.config, r.val_acc) for r in run_sweep(expand_grid(grid), X, y, Xv, yv).results] == want
        assert not list(tmp_path.iterdir())
    monkeypatch.undo()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(logistic_worker, "WORKER", "on")
    started, start = [], logistic_worker.Ahead.__init__

    def record(self, *args):
        start(self, *args)
        started.append(self)

    def interrupted(*args):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(logistic_worker.Ahead, "__init__", record)
    monkeypatch.setattr(sw, "_run_unit", interrupted)
    outcome = run_sweep(expand_grid(grid), X, y, Xv, yv)
    assert outcome.interrupted and not outcome.results and len(started) == 1
    assert started[0].proc.poll() is not None and not list(tmp_path.iterdir())
    assert capsys.readouterr().err == ""
