import json
import subprocess
import sys
from pathlib import Path

import run_pipeline
from pipeline.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent


def test_all_stages_from_one_params_file(params_file, tmp_path, capsys):
    assert run_pipeline.main(["--params", str(params_file), "extract", "head", "logistic", "finetune"]) == 0
    out = capsys.readouterr().out
    metrics = read_metrics(tmp_path / "runs" / "t")
    assert set(metrics) == {"extract", "head", "logistic", "finetune"}
    assert set(metrics["extract"]) >= {"images", "seconds", "images_per_second", "cache_hit", "cache_file"}
    for stage in ("head", "logistic", "finetune"):
        assert set(metrics[stage]) >= {"val_acc", "seconds"}
        assert f"{metrics[stage]['val_acc']:.4f}" in out
    assert "best_epoch" in metrics["head"] and "C" in metrics["logistic"]
    saved = json.loads((tmp_path / "runs" / "t" / "config.json").read_text())
    assert saved["backbone"]["name"] == "resnet18"


def test_single_stage_and_overrides(params_file, tmp_path):
    assert run_pipeline.main(["--params", str(params_file), "head", "--set", "head.epochs=2",
                              "--set", "run.name=other"]) == 0
    metrics = read_metrics(tmp_path / "runs" / "other")
    assert metrics["head"]["epochs"] == 2 and set(metrics) == {"extract", "head"}


def test_second_run_reports_cache_hit(params_file, capsys):
    run_pipeline.main(["--params", str(params_file), "extract"])
    capsys.readouterr()
    run_pipeline.main(["--params", str(params_file), "extract"])
    assert "cache hit" in capsys.readouterr().out


def test_results_table_marks_the_entries_this_run_left_as_they_were(params_file, capsys):
    def rows() -> dict:
        table = capsys.readouterr().out.split("\nresults (")[1].splitlines()[3:]
        return {line.split()[0]: line for line in table if not line.startswith("note:")}

    run_pipeline.main(["--params", str(params_file), "extract", "head", "--set", "head.epochs=1"])
    assert not [line for line in rows().values() if "from an earlier run" in line]
    run_pipeline.main(["--params", str(params_file), "head", "--set", "head.epochs=2"])  # warm: no extraction
    table = rows()
    assert table["extract"].endswith("(from an earlier run)") and "earlier" not in table["head"]


def test_errors_are_one_line_without_traceback(params_file, capsys):
    assert run_pipeline.main(["--params", str(params_file), "--set", "head.lr=-1"]) == 2
    assert run_pipeline.main(["--params", str(params_file), "train"]) == 2
    assert run_pipeline.main(["--params", str(params_file), "--set", "data.root=/no/such/dir"]) == 2
    err = capsys.readouterr().err
    assert "head.lr: must be > 0" in err and "unknown stage 'train' (stages: " in err
    assert "data.root '/no/such/dir' is not a folder" in err and "Traceback" not in err


def test_a_misspelt_stage_gets_the_closest_name(params_file, capsys):
    assert run_pipeline.main(["--params", str(params_file), "haed"]) == 2
    err = capsys.readouterr().err
    assert "unknown stage 'haed' (did you mean 'head'?) (stages: extract, head," in err


def test_help_lists_stages_and_keys():
    out = subprocess.run([sys.executable, "run_pipeline.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    for word in ("extract", "head", "logistic", "finetune", "benchmark", "report", "predict PATH",
                 "backbone.image_size", "backbone.cut", "head.type", "finetune.init_head", "benchmark.backbones",
                 "predict.model", "--set", "--output"):
        assert word in out, word


def test_predict_arguments_are_checked(params_file, capsys):
    assert run_pipeline.main(["--params", str(params_file), "predict"]) == 2
    assert run_pipeline.main(["--params", str(params_file), "head", "--output", "x.csv"]) == 2
    assert run_pipeline.main(["--params", str(params_file), "head", "img.png"]) == 2
    err = capsys.readouterr().err
    assert "predict needs image files or folders" in err and "--output is for the predict stage" in err
    assert "unknown stage 'img.png'" in err


def test_stages_then_predict_then_report(params_file, image_root, tmp_path, capsys):
    image = image_root / "val" / "ants" / "img_000.png"
    assert run_pipeline.main(["--params", str(params_file), "head", "predict", str(image)]) == 0
    out = capsys.readouterr().out
    assert "head: best val_acc" in out and str(image) in out and "1 of 1 images classified" in out
    assert run_pipeline.main(["--params", str(params_file), "report"]) == 0
    assert (tmp_path / "runs" / "t" / "reports" / "head_confusion_matrix.png").is_file()


def test_benchmark_from_the_cli(params_file, tmp_path, capsys):
    assert run_pipeline.main(["--params", str(params_file), "benchmark", "--set", "benchmark.methods=[\"logistic\"]"]) == 0
    out = capsys.readouterr().out
    assert "| resnet18 | logistic (C=" in out
    assert (tmp_path / "runs" / "t" / "benchmark.md").is_file()
