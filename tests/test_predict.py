import csv

import numpy as np
import pytest
import torch

import run_pipeline
from pipeline import PipelineError
from pipeline import cache as fc
from pipeline.config import load_config
from pipeline.predict import collect_images, run_predict
from pipeline.predictor import load_artifact, load_predictor, predictor_from_artifact

CPU = torch.device("cpu")


def cfg_for(trained_run, model, *extra):
    return load_config(None, trained_run.overrides + [f"predict.model={model}", *extra])


@pytest.mark.parametrize("model", ["head", "logistic", "finetune"])
def test_single_file(trained_run, model, capsys):
    image = trained_run.root / "val" / "bees" / "img_001.png"
    (row,) = run_predict(cfg_for(trained_run, model), CPU, [str(image)])
    assert row.ok and row.path == str(image)
    assert [c for c, _ in row.top] in (["ants", "bees"], ["bees", "ants"])  # top-k = min(3, 2 classes)
    probs = [p for _, p in row.top]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert f"{probs[0]:.4f}" in capsys.readouterr().out


def test_folder_lists_its_images_in_order(trained_run):
    rows = run_predict(cfg_for(trained_run, "head"), CPU, [str(trained_run.root / "val")])
    assert [r.path for r in rows] == [str(trained_run.root / "val" / c / f"img_{i:03d}.png")
                                      for c in ("ants", "bees") for i in range(3)]
    assert all(r.ok for r in rows)


def test_mix_with_unreadable_and_missing_files_via_cli(trained_run, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    (tmp_path / "empty").mkdir()
    good = trained_run.root / "val" / "ants" / "img_000.png"
    params = tmp_path / "p.json"
    params.write_text(__import__("json").dumps(trained_run.cfg.to_dict()))
    out_csv = tmp_path / "preds.csv"
    run_dir = trained_run.cfg.run_dir
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if not p.name.endswith(".lock")}
    args = ["--params", str(params), "--set", "predict.model=logistic", "predict", str(good), str(bad),
            str(trained_run.root / "val" / "bees"), str(tmp_path / "missing.png"), str(tmp_path / "empty"),
            "--output", str(out_csv)]
    assert run_pipeline.main(args) == 0
    out = capsys.readouterr().out
    assert "4 of 7 images classified" in out and "ERROR cannot read image" in out
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "error", "ok", "ok", "ok", "error", "error"]
    assert rows[0]["path"] == str(good) and rows[0]["class_1"] in ("ants", "bees")
    assert float(rows[0]["prob_1"]) >= float(rows[0]["prob_2"])
    assert rows[5]["error"] == "no such file or folder" and rows[6]["error"] == "folder has no image files"
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if not p.name.endswith(".lock")}
    assert after == before  # predict only reads the run folder (config.json included: it writes none)


def test_nothing_readable_is_an_error(trained_run, tmp_path):
    with pytest.raises(PipelineError, match="no image could be read"):
        run_predict(cfg_for(trained_run, "head"), CPU, [str(tmp_path / "missing.png")])


@pytest.mark.parametrize("model", ["head", "logistic"])
def test_rebuilt_backbone_reproduces_the_cached_features(trained_run, model):
    """Predicting from the image files gives what the model gives on the cached val features."""
    artifact = load_artifact(trained_run.cfg.run_dir, model)
    val = fc.read_cache(artifact["cache_file"]).val
    files = [str(trained_run.root / p) for p in val.paths]
    rows = run_predict(cfg_for(trained_run, model, "predict.top_k=2"), CPU, files)
    from_images = np.array([[dict(r.top)[c] for c in ("ants", "bees")] for r in rows])
    from_cache = predictor_from_artifact(model, artifact, CPU, with_backbone=False).probs_from_features(val.features)
    assert np.allclose(from_images, from_cache, atol=1e-4)


def test_finetuned_network_predicts_as_it_scored(trained_run):
    files = sorted((trained_run.root / "val").rglob("*.png"))
    rows = run_predict(cfg_for(trained_run, "finetune"), CPU, [str(f) for f in files])
    accuracy = np.mean([r.top[0][0] == f.parent.name for r, f in zip(rows, files)])
    assert accuracy == pytest.approx(trained_run.entries["finetune"]["val_acc"])


def test_changed_backbone_weights_are_refused(trained_run):
    artifact = dict(load_artifact(trained_run.cfg.run_dir, "head"))
    artifact["backbone"] = {**artifact["backbone"], "weights_id": "none(seed=99)"}
    with pytest.raises(PipelineError, match="backbone weights changed since this model was trained"):
        predictor_from_artifact("head", artifact, CPU)


def test_dense_classifier_head_is_rebuilt(tmp_path):
    """AlexNet's own dense layers, trained on the conv cache, predict from images as from the cache."""
    from pipeline.head import run_head
    from tests.conftest import make_image_folder, tiny_overrides

    root = make_image_folder(tmp_path / "imgs", n_train=2, n_val=2)
    cfg = load_config(None, tiny_overrides(tmp_path, root) + [
        "backbone.name=alexnet", "backbone.image_size=64", "backbone.cut=conv", "head.type=classifier",
        "head.epochs=1"])
    run_head(cfg, CPU)
    predictor = load_predictor(cfg.run_dir, "head", CPU)
    val = fc.read_cache(predictor.artifact["cache_file"]).val
    rows = run_predict(cfg, CPU, [str(root / p) for p in val.paths])
    from_images = np.array([[dict(r.top)[c] for c in ("ants", "bees")] for r in rows])
    assert np.allclose(from_images, predictor.probs_from_features(val.features), atol=1e-4)


def test_collect_images_keeps_the_given_order(tmp_path):
    (tmp_path / "d" / ".hidden").mkdir(parents=True)
    for name in ("b.png", "a.jpg", "notes.txt", ".hidden/x.png"):
        (tmp_path / "d" / name).write_bytes(b"")
    (tmp_path / "f.tif").write_bytes(b"")
    found, repeated = collect_images([str(tmp_path / "f.tif"), str(tmp_path / "d"), str(tmp_path / "gone")])
    assert repeated == 0 and found == [(str(tmp_path / "f.tif"), None), (str(tmp_path / "d" / "a.jpg"), None),
                     (str(tmp_path / "d" / "b.png"), None), (str(tmp_path / "gone"), "no such file or folder")]


def test_a_file_named_twice_is_listed_once(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("a.jpg", "sub/b.png"):
        (tmp_path / "d" / name).write_bytes(b"")
    (tmp_path / "link.png").symlink_to(tmp_path / "d" / "sub" / "b.png")
    a, d = str(tmp_path / "d" / "a.jpg"), str(tmp_path / "d")
    again = str(tmp_path / "d" / "sub" / ".." / "a.jpg")
    found, repeated = collect_images([a, d, str(tmp_path / "d" / "sub"), str(tmp_path / "link.png"), again, "gone",
                                      "gone"])
    assert found == [(a, None), (str(tmp_path / "d" / "sub" / "b.png"), None), (str(tmp_path / "link.png"), None),
                     ("gone", "no such file or folder")]          # a link is a file of its own
    assert repeated == 4


def test_an_image_and_its_labelled_folder_are_scored_once(trained_run, capsys):
    val = trained_run.root / "val"
    one = str(val / "ants" / "img_000.png")
    rows = run_predict(cfg_for(trained_run, "head"), CPU, [one, str(val)])
    out = capsys.readouterr().out
    assert [r.path for r in rows].count(one) == 1 and len(rows) == 6
    assert "predict: 1 file was named more than once" in out and "on 6 labelled images" in out


def test_missing_model_points_at_benchmark_sub_folders(tmp_path):
    (tmp_path / "demo" / "resnet18").mkdir(parents=True)
    (tmp_path / "demo" / "resnet18" / "logistic.joblib").write_bytes(b"")
    with pytest.raises(PipelineError, match="no logistic model at .*run the logistic stage first.*"
                                            "--set run.name=demo/resnet18"):
        load_artifact(tmp_path / "demo", "logistic")
    with pytest.raises(PipelineError, match="no head model at .*run the head stage first"):
        load_artifact(tmp_path / "demo", "head")


def test_unwritable_output_fails_before_classifying(trained_run, tmp_path, monkeypatch):
    import pipeline.predict

    monkeypatch.setattr(pipeline.predict, "load_predictor", lambda *a: pytest.fail("classified first"))
    with pytest.raises(PipelineError, match="--output .* does not exist"):
        run_predict(cfg_for(trained_run, "head"), CPU, ["x.png"], output=str(tmp_path / "no" / "p.csv"))


def test_fifo_and_dev_zero_are_error_rows_not_a_hang(trained_run, tmp_path, capsys):
    import os

    os.mkfifo(tmp_path / "f.jpg")
    (tmp_path / "z.jpg").symlink_to("/dev/zero")
    good = trained_run.root / "val" / "ants" / "img_000.png"
    rows = run_predict(cfg_for(trained_run, "head"), CPU, [str(tmp_path / "f.jpg"), str(tmp_path / "z.jpg"), str(good)])
    assert [r.ok for r in rows] == [False, False, True]
    assert all("not a regular file" in r.error for r in rows[:2])


@pytest.mark.parametrize("output, message", [(".", "is a folder"), ("/dev/full", "is not a regular file"),
                                             ("ro/p.csv", "cannot write in folder")])
def test_bad_output_fails_before_classifying(trained_run, tmp_path, monkeypatch, read_only, output, message):
    import pipeline.predict

    (tmp_path / "ro").mkdir()
    read_only(tmp_path / "ro")  # mode 555, or chattr +i where we are root (root ignores the mode bits)
    monkeypatch.setattr(pipeline.predict, "load_predictor", lambda *a, **k: pytest.fail("classified first"))
    target = output if output.startswith("/") else str(tmp_path / output)
    with pytest.raises(PipelineError, match=message):
        run_predict(cfg_for(trained_run, "head"), CPU, ["x.png"], output=target)


def test_non_utf8_file_name_is_written_to_the_csv_as_its_own_bytes(trained_run, tmp_path):
    import os
    import shutil

    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    shutil.copyfile(trained_run.root / "val" / "bees" / "img_000.png", tmp_path / name)
    out = tmp_path / "p.csv"
    rows = run_predict(cfg_for(trained_run, "head"), CPU, [str(tmp_path)], output=str(out))
    assert [r.ok for r in rows] == [True]
    assert os.fsencode(str(tmp_path / name)) in out.read_bytes() and not list(tmp_path.glob(".*.tmp"))


def test_hand_made_model_with_missing_keys_is_one_line_even_with_trust(tmp_path):
    torch.save({"classes": ["ants", "bees"], "state_dict": {}}, tmp_path / "head.pt")
    with pytest.raises(PipelineError, match="lacks feature_dim, backbone_config, backbone, seed: run the head stage"):
        load_artifact(tmp_path, "head", trust=True)
    torch.save({"classes": ["ants", "bees"], "state_dict": {}, "feature_dim": 3, "backbone_config": {}, "seed": 0,
                "backbone": {"name": "resnet18"}}, tmp_path / "head.pt")
    with pytest.raises(PipelineError, match="lacks backbone.weights_id, backbone.preprocess: run the head stage"):
        load_artifact(tmp_path, "head", trust=True)
    torch.save({"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, tmp_path / "head.pt")   # a bare state dict
    with pytest.raises(PipelineError, match=r"'.*head.pt' is not a head model written by this tool"):
        load_artifact(tmp_path, "head", trust=True)


def test_labelled_folder_prints_top1_mean_per_class_and_confused_pairs(trained_run, tmp_path, capsys):
    import shutil

    folder = tmp_path / "labelled"
    shutil.copytree(trained_run.root / "val", folder)
    shutil.copytree(trained_run.root / "val" / "ants", folder / "wasps")   # a class the model does not know
    out_csv = tmp_path / "p.csv"
    rows = run_predict(cfg_for(trained_run, "head"), CPU, [str(folder)], output=str(out_csv))
    out = capsys.readouterr().out
    scored = [r for r in rows if r.true is not None]
    assert [r.true for r in scored] == ["ants"] * 3 + ["bees"] * 3
    assert all(r.true is None and r.ok for r in rows if "/wasps/" in r.path) and len(rows) == 9
    acc = np.mean([r.label == r.true for r in scored])
    per_class = np.mean([np.mean([r.label == c for r in scored if r.true == c]) for c in ("ants", "bees")])
    assert f"top-1 {acc:.4f}, mean per-class {per_class:.4f} on 6 labelled images" in out
    assert "most confused pairs:" in out
    assert out.count("class folders the model does not know: wasps (its classes: ants, bees)") == 1
    with open(out_csv, newline="") as f:
        assert [r["true"] for r in csv.DictReader(f)] == ["ants"] * 3 + ["bees"] * 3 + [""] * 3


def test_unlabelled_files_print_no_scores(trained_run, capsys):
    run_predict(cfg_for(trained_run, "head"), CPU, [str(trained_run.root / "val" / "ants" / "img_000.png")])
    out = capsys.readouterr().out
    assert "top-1" not in out and "confused" not in out and "true" not in out.splitlines()[1]


def test_labelled_summary_by_hand():
    from pipeline.predict import ImagePrediction, labelled_summary

    pairs = [("ants", "ants"), ("ants", "bees"), ("bees", "bees"), ("bees", "bees"), ("bees", "ants")]
    rows = [ImagePrediction(f"{i}.png", [(p, 0.9)], None, t) for i, (t, p) in enumerate(pairs)]
    rows.append(ImagePrediction("bad.png", [], "cannot read image", "ants"))   # unreadable: not scored
    text = labelled_summary(rows, ["ants", "bees"])
    assert text.splitlines()[0] == "predict: top-1 0.6000, mean per-class 0.5833 on 5 labelled images"
    lines = text.splitlines()
    assert lines[4].split() == ["ants", "bees", "1", "50.0%"] and lines[5].split() == ["bees", "ants", "1", "33.3%"]
    assert labelled_summary(rows[-1:], ["ants", "bees"]) is None
