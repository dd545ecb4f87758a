import pytest

from pipeline import PipelineError
from pipeline.artifacts import load_joblib, save_joblib


def test_joblib_roundtrip_leaves_no_temp_file(tmp_path):
    obj = {"kind": "logistic", "classes": ["a", "b"], "C": 0.1}
    path = save_joblib(obj, tmp_path / "sub" / "m.joblib")
    assert path == tmp_path / "sub" / "m.joblib"
    assert load_joblib(path) == obj
    assert [p.name for p in path.parent.iterdir()] == ["m.joblib"]


def test_missing_joblib_names_the_stage(tmp_path):
    with pytest.raises(PipelineError, match="no model file at .*run the stage that trains it first"):
        load_joblib(tmp_path / "nope.joblib")


def test_corrupt_joblib_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.joblib"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(PipelineError, match="cannot load .*bad.joblib' as a joblib model"):
        load_joblib(path)
