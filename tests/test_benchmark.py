import json
import os

import pytest
import torch

from pipeline import PipelineError
from pipeline.benchmark import (break_even_runs, loop_seconds_per_run, markdown_table, measure, run_benchmark)
from pipeline.metrics import mean_per_class_accuracy, read_metrics
from pipeline.report import val_predictions

CPU = torch.device("cpu")


def test_break_even_by_hand():
    # extraction 30 s once; a cached run 2 s; a loop run 12 s: each run saves 10 s -> 3 runs
    assert break_even_runs(30.0, 2.0, 12.0) == 3      # 30 + 3 * 2 = 36 <= 36 = 3 * 12
    assert break_even_runs(31.0, 2.0, 12.0) == 4      # 3 runs: 37 > 36; 4 runs: 39 <= 48
    assert break_even_runs(0.5, 2.0, 12.0) == 1       # the first run already pays
    assert break_even_runs(10.0, 2.0, 2.0) is None    # nothing saved per run: never
    assert break_even_runs(10.0, 3.0, 2.0) is None


def test_loop_cost_by_hand():
    # 25 epochs, each recomputing the backbone over train+val (4 s), plus the head's own 3 s
    assert loop_seconds_per_run(25, 4.0, 3.0) == pytest.approx(103.0)


def test_markdown_table_cells():
    table = markdown_table([{"backbone": "resnet18", "method": "head", "val_acc": 0.9, "fit_seconds": 0.123,
                             "total_seconds": 12.34, "break_even_runs": 2}])
    header, rule, row = table.splitlines()
    assert header.startswith("| backbone | method | val top-1 | mean per-class |")
    assert rule.count("|") == header.count("|")
    assert row.startswith("| resnet18 | head | 0.9000 | – | – | 0.12 |") and "| 12.3 |" in row
    assert row.endswith("| 2 |")


def test_benchmark_writes_table_json_chart(tiny_cfg, capsys):
    cfg = tiny_cfg("finetune.epochs=3", "benchmark.finetune_epochs=1", "head.epochs=5")
    result = run_benchmark(cfg, CPU)
    out = capsys.readouterr().out
    assert "| backbone | method |" in out and "pays for itself after" in out
    saved = json.loads((cfg.run_dir / "benchmark.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert (cfg.run_dir / "benchmark.md").read_text().count("| resnet18 |") == 4
    assert "was also used for selection (no test split was scored)" in (cfg.run_dir / "benchmark.md").read_text()
    assert (cfg.run_dir / "benchmark.png").read_bytes()[:4] == b"\x89PNG"
    env = saved["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["num_threads"] >= 1

    methods = [r["method"] for r in saved["rows"]]
    assert methods == ["extract (cache miss)", "head (linear, 5 epochs)", "logistic (C=0.1)",
                       "finetune (1 epoch of finetune.epochs=3)"]  # the shortened finetune is said
    ex, head, logistic, finetune = saved["rows"]
    run_dir = cfg.run_dir / "resnet18"
    metrics = read_metrics(run_dir)
    assert metrics["finetune"]["epochs"] == 1 and len(metrics["finetune"]["history"]) == 1

    # the arithmetic, recomputed from the recorded measurements
    be = saved["backbones"][0]["break_even"]
    n_images = saved["data"]["n_train"] + saved["data"]["n_val"]
    assert n_images == 18 and be["backbone_pass_seconds"] == pytest.approx(n_images / ex["images_per_second"])
    assert be["loop_seconds_per_run"] == pytest.approx(5 * be["backbone_pass_seconds"] + head["fit_seconds"])
    assert head["break_even_runs"] == break_even_runs(ex["extract_seconds"], head["fit_seconds"],
                                                      be["loop_seconds_per_run"])
    assert head["total_seconds"] >= ex["extract_seconds"] + head["fit_seconds"]
    assert finetune["finetune_seconds_per_epoch"] == pytest.approx(finetune["finetune_seconds"], rel=1e-2)

    # accuracies are those of the saved models
    preds = val_predictions(run_dir, "head", CPU)
    assert head["mean_per_class_acc"] == pytest.approx(
        mean_per_class_accuracy(preds.targets, preds.predicted, 2), abs=1e-4)
    assert head["val_acc"] == metrics["head"]["val_acc"] and logistic["val_acc"] == metrics["logistic"]["val_acc"]
    assert all(r["peak_rss_mib"] > 50 for r in saved["rows"]) and all(r["peak_gpu_mib"] is None for r in saved["rows"])


def test_second_benchmark_reuses_the_cache_and_times_a_sample(tiny_cfg):
    cfg = tiny_cfg("benchmark.methods=[\"head\"]", "benchmark.timing_images=5")
    run_benchmark(cfg, CPU)
    again = run_benchmark(cfg, CPU)
    ex = again["backbones"][0]["steps"]["extract"]
    assert ex["cache_hit"] is True and "timed now on 5 images" in ex["source"]
    assert again["rows"][0]["method"] == "extract (cache hit)" and ex["images_per_second"] > 0


def test_several_backbones_each_get_a_run_folder(tiny_cfg):
    cfg = tiny_cfg("benchmark.backbones=[\"resnet18\", \"alexnet\"]", "backbone.image_size=64",
                   "benchmark.methods=[\"logistic\"]")
    result = run_benchmark(cfg, CPU)
    assert [(r["backbone"], r["method"].split(" ")[0]) for r in result["rows"]] == [
        ("resnet18", "extract"), ("resnet18", "logistic"), ("alexnet", "extract"), ("alexnet", "logistic")]
    assert (cfg.run_dir / "alexnet" / "logistic.joblib").is_file()
    assert (cfg.run_dir / "resnet18" / "logistic.joblib").is_file()


@pytest.mark.parametrize("overrides, message", [
    (["benchmark.backbones=[\"resnet18\", \"resnet19\"]"],
     r"benchmark.backbones\[1\] 'resnet19' is not supported(.|\n)*drop it: --set 'benchmark.backbones=\[\"resnet18\"\]'"),
    (["benchmark.backbones=[\"vgg11\", \"resnet18\"]", "backbone.cut=conv"],
     r"benchmark.backbones\[1\] 'resnet18': backbone.cut 'conv' needs"),
    (["benchmark.backbones=[\"resnet18\", \"timm/resnet5O\"]"], r"benchmark.backbones\[1\] 'timm/resnet5O' is not a timm model"),
])
def test_every_backbone_is_checked_before_anything_runs(tiny_cfg, overrides, message):
    cfg = tiny_cfg(*overrides)
    with pytest.raises(PipelineError, match=message):
        run_benchmark(cfg, CPU)
    assert not cfg.run_dir.exists()


def test_isolated_step_runs_in_its_own_process(tiny_cfg):
    step = measure("extract", tiny_cfg("benchmark.isolate=true"), CPU)
    assert step["pid"] != os.getpid() and step["cache_hit"] is False
    assert step["peak_rss_mib"] >= step["peak_rss_before_mib"] > 0
    assert measure("extract", tiny_cfg(), CPU)["pid"] == os.getpid()  # benchmark.isolate=false


def test_chart_axis_spans_the_data_and_bars_end_at_the_table_totals(tmp_path, monkeypatch):
    from pipeline import plots

    assert plots.accuracy_axis_start([0.93, 0.95]) == pytest.approx(0.85)
    assert plots.accuracy_axis_start([0.2, 0.95]) == pytest.approx(0.15)
    assert plots.accuracy_axis_start([0.06, 0.95]) == 0.0
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    rows = [{"backbone": "a", "method": "head", "val_acc": 0.93, "mean_per_class_acc": 0.94, "extract_seconds": 10.0,
             "fit_seconds": 2.0, "total_seconds": 13.5},
            {"backbone": "b", "method": "finetune", "val_acc": 0.95, "mean_per_class_acc": 0.951,
             "finetune_seconds": 30.0, "total_seconds": 31.0}]
    plots.plot_benchmark(rows, tmp_path / "b.png", "t")
    ax_acc, ax_time = figures[0].axes[:2]
    assert ax_acc.get_xlim()[0] == pytest.approx(0.85)
    labels = sorted(t.get_text() for t in ax_acc.texts)
    assert labels == ["0.930", "0.940", "0.950", "0.951"]  # every bar carries its value
    ends = {}
    for bar in ax_time.patches:
        row = round(bar.get_y() + bar.get_height() / 2)
        ends[row] = max(ends.get(row, 0.0), bar.get_x() + bar.get_width())
    assert ends == {0: pytest.approx(13.5), 1: pytest.approx(31.0)}
    assert sorted(t.get_text() for t in ax_time.texts) == ["13.5 s", "31.0 s"]


def test_unavailable_weights_stop_the_benchmark_before_any_step(tiny_cfg, tmp_path, monkeypatch):
    import urllib.error

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cfg = tiny_cfg("benchmark.backbones=[\"resnet18@none\", \"alexnet@DEFAULT\"]", "benchmark.methods=[\"logistic\"]")
    with pytest.raises(PipelineError) as err:
        run_benchmark(cfg, CPU)
    text = str(err.value)
    assert text.startswith("benchmark.backbones[1] 'alexnet@DEFAULT': could not download the weights of alexnet")
    assert "--set backbone.name=" not in text and "drop it: --set 'benchmark.backbones=[\"resnet18@none\"]'" in text
    assert not cfg.run_dir.exists()  # nothing ran, not even the first backbone


def test_entries_may_carry_their_own_weights(tiny_cfg):
    from pipeline.benchmark import backbone_config

    cfg = tiny_cfg("backbone.weights=DEFAULT")
    bb = backbone_config(cfg, "resnet18@none").backbone
    assert (bb.name, bb.weights) == ("resnet18", "none")
    assert backbone_config(cfg, "resnet18").backbone.weights == "DEFAULT"
    assert backbone_config(cfg, "timm/test_resnet@none").run_dir.name == "timm-test_resnet@none"


def test_spawned_worker_dies_with_its_killed_parent(tmp_path):
    """kill -9 of the benchmark process must not leave its spawned worker blocked on a pipe forever."""
    import os
    import signal
    import time

    from pipeline.fsutil import pid_alive
    from tests import child

    pid_file = tmp_path / "worker.pid"
    parent = child.start(child.pool_worker_then_wait, str(pid_file))
    deadline = time.monotonic() + 120
    while not pid_file.exists() or not pid_file.read_text():
        assert parent.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    worker = int(pid_file.read_text())

    def running(pid: int) -> bool:  # a zombie waiting to be reaped by init has exited
        try:
            return pid_alive(pid) and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    assert running(worker)
    os.kill(parent.pid, signal.SIGKILL)
    parent.join(30)
    deadline = time.monotonic() + 30
    while running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(worker), "the worker outlived its parent"


def _steps(**head_changes) -> dict:
    measured = {"mean_per_class_acc": 0.5, "peak_rss_mib": 100.0, "peak_gpu_mib": None}
    head = {"val_acc": 0.75, "seconds": 3.0, "model_file": "runs/t/head.pt", "history": [], "record_version": 1,
            "train_seconds": 2.0, **measured}
    return {"extract": {"cache_hit": False, "extract_seconds": 30.0, "images_per_second": 10.0, "n_train": 100,
                        "n_val": 20, "peak_rss_mib": 200.0, "peak_gpu_mib": None},
            "head": {k: v for k, v in {**head, **head_changes}.items() if head_changes.get(k, 0) is not None}}


def test_rows_come_from_the_step_entries_read_as_records():
    from pipeline.benchmark import method_rows
    from pipeline.config import HeadConfig

    rows, break_even = method_rows(_steps(), HeadConfig(epochs=5), 3, "benchmark of resnet18")
    assert [r["method"] for r in rows] == ["extract (cache miss)", "head (linear, 5 epochs)"]
    head = rows[1]
    assert (head["val_acc"], head["fit_seconds"], head["total_seconds"]) == (0.75, 2.0, 33.0)
    # a loop run: 5 epochs x 12 s over 120 images + 2 s = 62 s; each cached run saves 60 s: 1 run pays
    assert break_even["loop_seconds_per_run"] == pytest.approx(62.0) and head["break_even_runs"] == 1


def test_a_renamed_or_newer_step_entry_fails_naming_the_step_and_version():
    from pipeline.benchmark import method_rows
    from pipeline.config import HeadConfig
    from pipeline.records import RecordError

    renamed = _steps(train_seconds=None, fit_seconds=2.0)
    with pytest.raises(RecordError, match=r"benchmark of resnet18 entry 'head' \(record version 1\) lacks "
                                          r"train_seconds: run the head stage again"):
        method_rows(renamed, HeadConfig(), 3, "benchmark of resnet18")
    with pytest.raises(RecordError, match=r"entry 'head' was written by a newer version .*record version 5"):
        method_rows(_steps(record_version=5), HeadConfig(), 3, "benchmark of resnet18")


def test_test_leads_the_benchmark_table_and_chart_and_without_it_the_val_figures_say_they_chose(tmp_path,
                                                                                                  monkeypatch):
    from pipeline import plots
    from pipeline.benchmark import method_rows
    from pipeline.benchmark_report import selection_text
    from pipeline.config import HeadConfig

    chosen = {"best_epoch": 3, "selected_on": "val (best epoch)"}
    rows, _ = method_rows(_steps(test_acc=0.6, test_mean_per_class=0.55, **chosen), HeadConfig(epochs=5), 3, "b")
    head = rows[1]
    assert (head["test_acc"], head["test_mean_per_class"], head["selected_on"]) == (0.6, 0.55, "val (best epoch)")
    header, _, _, row = markdown_table(rows).splitlines()
    assert header.startswith("| backbone | method | test top-1 | test mean per-class | val top-1 |")
    assert row.startswith("| – | head (linear, 5 epochs) | 0.6000 | 0.5500 | 0.7500 |")
    assert selection_text(rows).startswith("test is the headline figure: each model was scored once on test")
    untested, _ = method_rows(_steps(**chosen), HeadConfig(epochs=5), 3, "b")
    assert "test top-1" not in markdown_table(untested)
    assert selection_text(untested) == ("val top-1 of head (linear, 5 epochs) was also used for selection (no test "
                                        "split was scored), so optimistic: add a test/ folder (or data.test_fraction) "
                                        "for a figure nothing was chosen on.")
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    plots.plot_benchmark([{**head, "backbone": "a"}], tmp_path / "b.png", "t", split="test")
    ax_acc = figures[0].axes[0]
    assert ax_acc.get_title() == "accuracy on test" and sorted(t.get_text() for t in ax_acc.texts) == ["0.550", "0.600"]
