"""pipeline.malloc: freed memory kept for reuse, so a large tensor allocated again costs no page faults."""
import platform
import sys

import pytest

from tests import child

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def faults_of_a_second_large_tensor(reuse: bool) -> tuple[bool, int]:
    """(whether reuse_freed_memory applied, minor page faults while a 60 MiB tensor is made and filled
    after a 64 MiB one was freed)."""
    import resource

    import torch

    from pipeline.malloc import reuse_freed_memory

    applied = reuse_freed_memory() if reuse else False
    x = torch.ones(16 * 2 ** 20)             # 64 MiB: above glibc's largest mmap threshold (32 MiB)
    del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.ones(15 * 2 ** 20)             # fits in the freed block
    del y
    return applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_a_large_tensor_made_again_reuses_the_freed_memory():
    status, (applied, faults) = child.call(faults_of_a_second_large_tensor, True)
    assert status == "ok" and applied
    assert faults < 200                          # 15,360 pages: none faulted in again
    status, (applied, faults) = child.call(faults_of_a_second_large_tensor, False)
    assert status == "ok" and not applied
    assert faults > 8000                         # glibc's default: mapped afresh and faulted in


@pytest.mark.parametrize("reuse", [True, False])
def test_the_cli_applies_it_as_run_reuse_memory_says(monkeypatch, tmp_path, reuse):
    import run_pipeline
    from pipeline import malloc

    calls = []
    monkeypatch.setattr(malloc, "reuse_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.chdir(tmp_path)
    assert run_pipeline.main(["leaderboard", "--all", "--set", f"run.reuse_memory={str(reuse).lower()}"]) == 0
    assert calls == ([1] if reuse else [])


@pytest.mark.parametrize("reuse", [True, False])
def test_load_features_applies_it_when_it_extracts(monkeypatch, tmp_path, image_root, reuse):
    from pipeline import api, malloc
    from tests.test_api import tiny

    calls = []
    monkeypatch.setattr(malloc, "reuse_freed_memory", lambda: calls.append(1) or True)
    fs = api.load_features(image_root, **tiny(tmp_path), params={"run": {"reuse_memory": reuse}})
    assert calls == ([1] if reuse else [])
    api.load_features(fs.path, output_dir=tmp_path / "runs")          # a cache file alone: nothing to extract
    assert calls == ([1] if reuse else [])
