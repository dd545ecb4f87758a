import os
import subprocess
import sys
from pathlib import Path

import torch

import run_pipeline
from pipeline.runtime import apply_stage_threads, available_cores, stage_threads

REPO = Path(__file__).resolve().parent.parent


def test_threads_are_sized_to_the_stage():
    cores = available_cores()
    assert cores == len(os.sched_getaffinity(0))
    assert stage_threads("head", "linear", 0) == 1 and stage_threads("logistic", "linear", 0) == 1
    assert stage_threads("head", "classifier", 0) == cores  # VGG's dense layers are big matmuls
    assert stage_threads("head", "knn", 0) == stage_threads("head", "ncm", 0) == stage_threads("leaderboard", "linear", 0) == 1
    assert stage_threads("head", "mlp", 0) == stage_threads("sweep", "linear", 0) == cores   # big window GEMMs
    for stage in ("extract", "finetune", "benchmark", "report", "predict"):
        assert stage_threads(stage, "linear", 0) == cores
    assert stage_threads("head", "linear", 3) == 3 and stage_threads("extract", "linear", 5) == 5  # run.num_threads


def test_each_stage_runs_with_its_threads(params_file, monkeypatch):
    seen = {}
    monkeypatch.setattr(run_pipeline, "_run_stage", lambda stage, *a: seen.setdefault(stage, torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        assert run_pipeline.main(["--params", str(params_file), "extract", "head", "logistic"]) == 0
        assert seen == {"extract": available_cores(), "head": 1, "logistic": 1}
        seen.clear()
        assert run_pipeline.main(["--params", str(params_file), "head", "extract", "--set", "run.num_threads=2"]) == 0
        assert seen == {"head": 2, "extract": 2}
    finally:
        torch.set_num_threads(before)


def test_apply_stage_threads_sets_torch():
    before = torch.get_num_threads()
    try:
        assert apply_stage_threads("head", "linear", 0) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_openmp_threads_sleep_when_idle(tmp_path):
    code = ("import os, run_pipeline; run_pipeline.main(['--params', 'missing.json']); "
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = lambda: subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                                 capture_output=True, text=True, check=True).stdout.split()[-1]
    assert run() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # a user's own setting wins
    assert run() == "ACTIVE"
