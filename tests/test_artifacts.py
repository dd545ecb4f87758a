import pickle
import shutil
import subprocess

import joblib
import pytest
import torch

import run_pipeline
from pipeline import PipelineError
from pipeline.artifacts import (SUMS_FILE, ArtifactError, load_checkpoint, load_joblib, recorded_sha256,
                                save_checkpoint, save_joblib)
from pipeline.config import load_config


class Payload:
    """Unpickling this runs code: it creates the file named in its argument."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_saved_files_are_recorded_and_load(tmp_path):
    ckpt = save_checkpoint({"w": torch.ones(2), "seed": 3}, tmp_path / "head.pt")
    model = save_joblib({"C": 1.0}, tmp_path / "logistic.joblib")
    lines = (tmp_path / SUMS_FILE).read_text().splitlines()
    assert len(lines) == 2 and all(len(line.split("  ")[0]) == 64 for line in lines)
    assert torch.equal(load_checkpoint(ckpt)["w"], torch.ones(2))
    assert load_joblib(model) == {"C": 1.0}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    if shutil.which("sha256sum"):  # the record is the standard format
        subprocess.run(["sha256sum", "-c", "--quiet", SUMS_FILE], cwd=tmp_path, check=True)


def test_resaving_replaces_the_record(tmp_path):
    save_checkpoint({"w": torch.zeros(1)}, tmp_path / "head.pt")
    first = recorded_sha256(tmp_path / "head.pt")
    save_checkpoint({"w": torch.ones(1)}, tmp_path / "head.pt")
    assert recorded_sha256(tmp_path / "head.pt") != first
    assert load_checkpoint(tmp_path / "head.pt")["w"].item() == 1.0


def test_unrecorded_joblib_is_refused_before_unpickling(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "logistic.joblib"
    joblib.dump(Payload(str(marker)), path)  # not through save_joblib: no record
    with pytest.raises(ArtifactError, match=r"refusing to load '.*logistic\.joblib'.*not recorded.*--trust"):
        load_joblib(path)
    assert not marker.exists()


def test_modified_joblib_is_refused(tmp_path):
    path = save_joblib({"C": 1.0}, tmp_path / "logistic.joblib")
    marker = tmp_path / "code-ran"
    joblib.dump(Payload(str(marker)), path)  # swapped after saving
    with pytest.raises(ArtifactError, match="differs from .* recorded .* changed since.*--trust"):
        load_joblib(path)
    assert not marker.exists()


def test_trust_flag_loads_an_unrecorded_file(tmp_path):
    path = tmp_path / "other.joblib"
    joblib.dump({"C": 2.0}, path)
    assert load_joblib(path, trust=True) == {"C": 2.0}
    torch.save({"w": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ArtifactError, match="other.pt.*--trust"):
        load_checkpoint(tmp_path / "other.pt")
    assert load_checkpoint(tmp_path / "other.pt", trust=True)["w"].item() == 1.0


def test_checkpoints_never_unpickle_code_even_when_trusted(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": Payload(str(marker))}, f, protocol=2)
    with pytest.raises(ArtifactError, match="cannot load .* as a checkpoint"):
        load_checkpoint(path, trust=True)
    assert not marker.exists()


def test_missing_artifact_says_which_stage(tmp_path):
    with pytest.raises(ArtifactError, match="no model file at .*run the stage"):
        load_joblib(tmp_path / "none.joblib")


def test_cli_trust_flag_sets_the_config_key(params_file, monkeypatch):
    seen = {}

    def record_and_stop(path, overrides):
        seen["cfg"] = load_config(path, overrides)
        raise PipelineError("stop here")

    monkeypatch.setattr("pipeline.config.load_config", record_and_stop)
    assert run_pipeline.main(["--params", str(params_file), "--trust", "extract"]) == 2
    assert seen["cfg"].run.trust_artifacts is True
    assert load_config(params_file).run.trust_artifacts is False
