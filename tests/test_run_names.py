"""Issue 12's own data beside the demo's: a run folder and a cache file per dataset, listed by `caches`."""
from pathlib import Path

import numpy as np
import torch

import run_pipeline
from pipeline import cache as fc
from pipeline.cache.catalog import list_caches
from pipeline.config import load_config
from pipeline.extract import run_extract
from pipeline.fsutil import data_name
from pipeline.metrics import read_metrics
from pipeline.predictor import load_artifact
from pipeline.runname import DEMO_RUN_NAMES, data_run_name, resolve_run_name
from tests.conftest import make_image_folder, tiny_overrides

CPU = torch.device("cpu")


def test_the_default_run_name_comes_from_the_data(tmp_path):
    assert load_config(None).run.name is None and load_config(None).run_dir == Path("runs/demo")
    assert load_config(None, ["data.root=demo:digits"]).run_dir == Path("runs/demo-digits")
    a, b = tmp_path / "a" / "photos", tmp_path / "b" / "photos"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    name_a, name_b = (load_config(None, [f"data.root={p}"]).run_dir.name for p in (a, b))
    assert name_a != name_b and name_a.startswith("photos-") and len(name_a) == len("photos-") + 8
    (tmp_path / "link").symlink_to(a)
    assert load_config(None, [f"data.root={tmp_path / 'link'}"]).run_dir.name == name_a  # the same folder
    assert load_config(None, [f"data.root={a}", "run.name=mine"]).run_dir == Path("runs/mine")
    assert data_run_name(str(DEMO_RUN_NAMES["demo:flowers"][1])) == "demo"  # the path a cache records
    assert data_name("/x/my photos.v2").startswith("my-photos-v2-")    # no '.' or space in a file name


def cli(tmp_path: Path, root: Path, *args: str) -> int:
    """The CLI on the tiny setup with run.name left to the data."""
    sets = [s for s in tiny_overrides(tmp_path, root) if not s.startswith("run.name=")]
    return run_pipeline.main([a for s in sets for a in ("--set", s)] + list(args))


def test_switching_datasets_a_b_a_keeps_each_run_folder_and_runs_no_forward_pass_the_third_time(tmp_path, capsys):
    a = make_image_folder(tmp_path / "ants_bees")
    b = make_image_folder(tmp_path / "flowers", classes=("daisy", "rose", "tulip"), n_train=2, n_val=1, seed=1)
    assert cli(tmp_path, a, "head") == 0 and cli(tmp_path, b, "head") == 0
    assert cli(tmp_path, a, "extract") == 0
    run_a, run_b = (tmp_path / "runs" / data_run_name(str(r)) for r in (a, b))
    # one run folder per dataset (the ledger of every head tried sits beside them)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()) == sorted([run_a.name, run_b.name])
    third = read_metrics(run_a)["extract"]
    assert third["cache_hit"] and third["rows_extracted"] == 0 and "cache hit" in capsys.readouterr().out
    assert load_artifact(run_a, "head")["classes"] == ["ants", "bees"]            # not replaced by b's head
    assert load_artifact(run_b, "head")["classes"] == ["daisy", "rose", "tulip"]
    caches = sorted(p.name.split(".")[0] for p in (tmp_path / "cache").glob("*.h5") if not p.name.startswith("scan-"))
    assert caches == sorted([data_name(a), data_name(b)])                         # both kept, side by side

    assert run_pipeline.main(["caches", "--set", f"extract.cache_dir={tmp_path / 'cache'}"]) == 0
    out = capsys.readouterr().out
    for entry in list_caches(tmp_path / "cache"):
        assert entry.path.name in out and entry.status == "complete" and not entry.old_name
    assert str(a) in out and str(b) in out and "resnet18" in out and "2 cache file(s)" in out
    assert sorted(e.rows for e in list_caches(tmp_path / "cache")) == [9, 18]


def test_caches_needs_no_torch_and_runs_alone(tmp_path, capsys):
    from tests.test_imports import loaded_by

    assert loaded_by(["caches", "--set", f"extract.cache_dir={tmp_path}"]) == (0, {"h5py"})  # no torch
    assert run_pipeline.main(["caches", "head"]) == 2
    assert "'caches' runs on its own" in capsys.readouterr().err
    assert run_pipeline.main(["caches", "--set", f"extract.cache_dir={tmp_path / 'none'}"]) == 0
    assert "no feature cache in" in capsys.readouterr().out


def test_a_cache_file_under_the_old_name_is_reused_without_a_forward_pass_and_still_loads(tiny_cfg):
    cfg = tiny_cfg()
    new = Path(run_extract(cfg, CPU)["cache_file"])
    old = fc.legacy_cache_path(new)
    assert old.name == new.name.split(".", 1)[1] and old.name.startswith("resnet18-")
    new.rename(old)                                   # what an older version left in cache/
    again = run_extract(cfg, CPU)
    assert not again["cache_hit"] and again["rows_extracted"] == 0 and again["rows_reused"] == 18
    assert Path(again["cache_file"]) == new and old.is_file()
    assert np.array_equal(fc.read_cache(old).train.features, fc.read_cache(new).train.features)
    assert fc.open_cache(old).key == fc.open_cache(new).key  # the old file still loads (as features.file)
    assert [e.old_name for e in list_caches(cfg.extract.cache_dir)] in ([True, False], [False, True])


def test_a_cache_file_alone_uses_its_data_s_run_folder(tmp_path, image_root, capsys):
    assert cli(tmp_path, image_root, "head") == 0
    (cache_file,) = [p for p in (tmp_path / "cache").glob("*.h5") if not p.name.startswith("scan-")]
    cfg = load_config(None, [f"features.file={cache_file}", f"run.output_dir={tmp_path / 'runs'}"])
    assert resolve_run_name(cfg) == data_run_name(str(image_root)) and cfg.data.root == str(image_root)
    # the same folder, so the one-dataset check passes: data.root is the file's
    assert run_pipeline.main(["head", "--set", f"features.file={cache_file}", "--set", "head.epochs=2", "--set",
                              f"run.output_dir={tmp_path / 'runs'}", "--set", "report.enabled=false"]) == 0
    assert "holds results on" not in capsys.readouterr().err
    assert read_metrics(tmp_path / "runs" / data_run_name(str(image_root)))["head"]["epochs"] == 2
