"""Typed, versioned model-file and metrics records: written and read in one place."""
import pytest
import torch

from pipeline.artifacts import save_checkpoint
from pipeline.predictor import load_artifact
from pipeline.records import RECORD_VERSION, ModelArtifact, RecordError, StageResult


def artifact(**extra) -> ModelArtifact:
    return ModelArtifact("head", ["a", "b"], {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, {"lr": 0.1},
                         {"name": "resnet18", "weights": "none", "weights_id": "none(seed=0)", "cut": "pool",
                          "preprocess": {}}, {"name": "resnet18", "weights": "none", "image_size": 32, "cut": "pool"},
                         0, "imgs", 3, "k" * 64, "cache/x.h5", [{"epoch": 1}], {"torch": "2"}, extra)


def test_a_model_file_round_trips_under_the_keys_its_readers_use():
    d = artifact(head_type="linear", best_epoch=1).to_dict()
    assert d["record_version"] == RECORD_VERSION and d["kind"] == "head"
    assert set(d["state_dict"]) == {"weight", "bias"} and d["head_config"] == {"lr": 0.1}
    assert d["head_type"] == "linear" and d["cache_key"] == "k" * 64 and d["feature_dim"] == 3
    back = ModelArtifact.from_dict(d)
    assert back.extra == {"head_type": "linear", "best_epoch": 1} and back.config == {"lr": 0.1}
    assert back.to_dict().keys() == d.keys()


def test_files_written_before_records_load_as_version_0():
    d = artifact().to_dict()
    del d["record_version"]
    assert ModelArtifact.from_dict(d).record_version == 0


def test_a_newer_or_broken_file_fails_naming_the_version(tmp_path):
    d = artifact().to_dict()
    with pytest.raises(RecordError, match=r"record version 99; this one reads versions up to 1"):
        ModelArtifact.from_dict({**d, "record_version": 99}, "'head.pt'")
    broken = {k: v for k, v in d.items() if k != "backbone"}
    with pytest.raises(RecordError, match=r"record version 1\) lacks backbone: run the head stage again"):
        ModelArtifact.from_dict(broken)
    save_checkpoint({**d, "record_version": 2}, tmp_path / "head.pt")
    with pytest.raises(RecordError, match=r"head.pt' was written by a newer version .*record version 2"):
        load_artifact(tmp_path, "head")


def test_stage_results_round_trip_and_check_their_version():
    entry = StageResult("head", 0.9, 1.5, "runs/t/head.pt", [{"epoch": 1}], {"best_epoch": 1}).to_dict()
    assert entry["val_acc"] == 0.9 and entry["best_epoch"] == 1 and entry["record_version"] == RECORD_VERSION
    assert StageResult.from_dict("head", entry).details == {"best_epoch": 1}
    with pytest.raises(RecordError, match="entry 'head' was written by a newer version"):
        StageResult.from_dict("head", {**entry, "record_version": 7})


def test_report_reads_metrics_entries_as_records_and_a_newer_one_fails_naming_the_file(tiny_cfg):
    import json

    from pipeline.head import run_head
    from pipeline.report import run_report

    cfg = tiny_cfg("head.epochs=1")
    run_head(cfg, torch.device("cpu"))
    metrics_file = cfg.run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    metrics["head"]["record_version"] = RECORD_VERSION + 1
    metrics_file.write_text(json.dumps(metrics))
    with pytest.raises(RecordError, match=rf"metrics.json' entry 'head' was written by a newer version .*"
                                          rf"record version {RECORD_VERSION + 1}"):
        run_report(cfg, torch.device("cpu"))
