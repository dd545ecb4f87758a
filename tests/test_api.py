"""pipeline.api: load_features (the CLI's cache, quietly), fit on a FeatureSet, load_model, the README example."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import run_pipeline
from pipeline import api
from pipeline import cache as fc
from pipeline.runname import data_run_name
from tests.conftest import make_image_folder
from tests.test_imports import HEAVY

REPO = Path(__file__).resolve().parent.parent


def tiny(tmp_path) -> dict:
    return dict(backbone="resnet18", weights="none", image_size=32, cache_dir=tmp_path / "cache",
                output_dir=tmp_path / "runs", device="cpu")


def test_importing_pipeline_and_its_api_prints_nothing_and_loads_no_heavy_library():
    quiet = subprocess.run([sys.executable, "-c", "import pipeline, pipeline.api"], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    probe = f"import sys, json, pipeline, pipeline.api; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert json.loads(loaded.stdout) == []


def test_the_heads_are_reexported_on_first_use():
    from pipeline import estimators

    assert api.LinearHead is estimators.LinearHead and api.KNNHead is estimators.KNNHead
    assert {"MLPHead", "NCMHead", "make_estimator", "load_features"} <= set(dir(api))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        api.Nope


def test_load_features_extracts_once_with_the_cli_cache_and_prints_nothing(tmp_path, image_root, capfd):
    fs = api.load_features(image_root, **tiny(tmp_path))
    assert capfd.readouterr() == ("", "")
    assert fs.classes == ["ants", "bees"] and fs.train.X.shape == (12, 512) and fs.val.X.shape == (6, 512)
    assert fs.train.X.dtype == np.float32 and fs.test is None and set(fs.splits) == {"train", "val"}
    assert not fs.extract["cache_hit"] and fs.extract["rows_extracted"] == 18 and "cache miss" in fs.log
    cache = fc.read_cache(fs.path)
    assert np.array_equal(fs.train.X, cache.train.features) and fs.train.paths == cache.train.paths
    assert fs.val.y.tolist() == cache.val.labels.tolist() and fs.backbone["name"] == "resnet18"
    assert fs.run_dir == tmp_path / "runs" / data_run_name(str(image_root))
    assert json.loads((fs.run_dir / "metrics.json").read_text())["extract"]["rows_extracted"] == 18  # as the CLI

    again = api.load_features(image_root, **tiny(tmp_path))
    assert again.extract["cache_hit"] and again.path == fs.path and np.array_equal(again.val.X, fs.val.X)
    alone = api.load_features(fs.path, output_dir=tmp_path / "runs")   # the cache file on its own
    assert alone.extract is None and np.array_equal(alone.train.X, fs.train.X) and alone.run_dir == fs.run_dir
    assert capfd.readouterr() == ("", "")
    api.load_features(image_root, **tiny(tmp_path), verbose=True)
    assert "cache hit" in capfd.readouterr().out


def test_load_features_errors_name_the_key(tmp_path):
    from pipeline import PipelineError

    with pytest.raises(PipelineError, match="backbone.image_size: must be > 0"):
        api.load_features(tmp_path, **{**tiny(tmp_path), "image_size": 0})
    with pytest.raises(PipelineError, match="has no 'train' folder"):
        api.load_features(tmp_path, **tiny(tmp_path))


def test_fit_any_classifier_on_a_feature_set(tmp_path, image_root):
    from sklearn.linear_model import LogisticRegression

    fs = api.load_features(image_root, **tiny(tmp_path))
    result = api.fit(LogisticRegression(max_iter=500), fs)
    by_hand = LogisticRegression(max_iter=500).fit(fs.train.X, fs.train.y).predict(fs.val.X)
    assert result["val"]["acc"] == pytest.approx(np.mean(by_hand == fs.val.y)) and result["val"]["n"] == 6
    assert result["selected_on"] is None and "test" not in result and result["seconds"] > 0
    knn = api.KNNHead(k=3)
    assert 0 <= api.fit(knn, fs)["val"]["mean_per_class"] <= 1 and knn.classes_.tolist() == [0, 1]
    linear = api.LinearHead(epochs=2)
    assert api.fit(linear, fs)["selected_on"] == "val" and len(linear.history_) == 2
    with_test = api.FeatureSet(fs.classes, fs.train, fs.val, fs.val, fs.path, fs.backbone, fs.data_root, fs.run_dir)
    assert api.fit(LogisticRegression(max_iter=500), with_test)["test"] == result["val"]  # scored once more, on test


def test_load_model_predicts_as_the_predict_stage(trained_run, capfd):
    from pipeline import PipelineError
    from pipeline.config import load_config
    from pipeline.predict import run_predict

    folder = trained_run.root / "val"
    model = api.load_model(trained_run.cfg.run_dir, "head", device="cpu")
    rows = model.predict(folder)
    assert capfd.readouterr() == ("", "")
    assert model.classes == ["ants", "bees"] and [r.true for r in rows] == ["ants"] * 3 + ["bees"] * 3
    import torch

    cli = run_predict(load_config(None, trained_run.overrides), torch.device("cpu"), [str(folder)])
    assert [(r.path, r.label) for r in rows] == [(r.path, r.label) for r in cli]
    assert np.allclose([r.probability for r in rows], [r.probability for r in cli], atol=1e-6)
    evaluation = model.evaluate(folder)
    assert evaluation["acc"] == pytest.approx(np.mean([r.label == r.true for r in rows])) and evaluation["n"] == 6
    assert sum(c for _, _, c in evaluation["confused_pairs"]) == sum(r.label != r.true for r in rows)
    (single,) = model.predict(str(folder / "ants" / "img_000.png"))
    assert single.ok and single.true is None and single.label in model.classes
    with pytest.raises(PipelineError, match=r"has no readable images in folders named after the model's classes "
                                            r"\(ants, bees\): expected .*/<class>/\*.jpg"):
        model.evaluate(folder / "ants")                     # images, but not in folders named after classes


def readme_example() -> str:
    """The Python block of README.md's 'From Python' section, as a user would paste it."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split("\n## From Python\n", 1)[1]
    return section.split("```python\n", 1)[1].split("\n```", 1)[0]


def test_the_readme_example_runs_verbatim(tmp_path, monkeypatch, capsys):
    code = readme_example()
    assert 5 <= len(code.splitlines()) <= 20
    make_image_folder(tmp_path / "hymenoptera_data")     # the example's folder: ants and bees, train and val
    monkeypatch.chdir(tmp_path)
    # the stage the example's comment names, so that the run folder has a head (few epochs, no reports)
    assert run_pipeline.main(["head", "--set", "data.root=hymenoptera_data", "--set", "data.num_workers=0",
                              "--set", "head.epochs=3", "--set", "report.enabled=false"]) == 0
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "['ants', 'bees']" in out and "(12, 1280)" in out and "'mean_per_class'" in out
    assert "hymenoptera_data/val/bees/img_000.png" in out and "confused_pairs" in out


def test_fit_on_a_cached_feature_set_is_in_the_ledger_and_arrays_are_not(tmp_path, image_root, capfd):
    from sklearn.linear_model import LogisticRegression

    from pipeline.ledger import best_heads, read_ledger

    fs = api.load_features(image_root, **tiny(tmp_path))
    ledger = tmp_path / "runs" / "ledger.jsonl"
    knn = api.fit(api.KNNHead(k=3), fs)
    logistic = api.fit(LogisticRegression(C=0.5, max_iter=500), fs)
    assert knn["ledger"] == logistic["ledger"] == str(ledger)
    api.KNNHead(k=5).fit(fs.train.X, fs.train.y)                              # plain arrays: no cache, no line
    assert api.fit(api.NCMHead(), fs, ledger=False)["ledger"] is None
    arrays = api.FeatureSet(fs.classes, fs.train, fs.val, None, fs.path, fs.backbone, fs.data_root, fs.run_dir)
    assert api.fit(api.NCMHead(), arrays)["ledger"] is None                  # built by hand: no cache key
    assert capfd.readouterr() == ("", "")                                     # and nothing printed
    entries = read_ledger(ledger).entries
    assert [(e.head_type, e.params, e.source) for e in entries] == [("knn", {"k": 3}, "api"),
                                                                     ("LogisticRegression", {"C": 0.5, "max_iter": 500},
                                                                      "api")]
    assert entries[0].cache_key == fs.key == fc.open_cache(fs.path).key and entries[0].val_acc == knn["val"]["acc"]
    assert entries[1].run_dir == str(fs.run_dir) and entries[1].cache_file == str(fs.path)
    assert entries[0].n_val == entries[1].n_val == len(fs.val.y)
    assert len(best_heads(entries, fs.key)) == 2                              # what `leaderboard` lists
    assert run_pipeline.main(["--set", f"features.file={fs.path}", "--set", f"run.output_dir={tmp_path / 'runs'}",
                              "leaderboard"]) == 0
    assert "LogisticRegression" in capfd.readouterr().out
