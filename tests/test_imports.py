"""Lean processes: each stage imports only the libraries it uses.

One fresh interpreter per test, which forks a child per command: each child starts from the same
modules (run_pipeline, and torch where preloaded) and reports the heavy modules it holds after
run_pipeline.main(argv), so a test pays for one interpreter and one torch import, not one per command.
"""
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# torch._dynamo is left out: torch.optim imports it on its own (first optimizer step)
HEAVY = ("torch", "torchvision", "sklearn", "matplotlib", "PIL.Image", "h5py")
PROBE = """
import json, os, sys
sys.path.insert(0, {root!r})
import run_pipeline
for name in {preload!r}:
    __import__(name)
results = []
for argv, heavy in {probes!r}:
    sys.stdout.flush()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the command, in a child that starts with exactly the parent's modules
        os.close(read)
        try:
            code = run_pipeline.main(argv)
        except SystemExit as e:
            code = e.code
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(write, json.dumps({{"code": code, "loaded": [m for m in heavy if m in sys.modules]}}).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    results.append(json.loads(text) if text else {{"code": "child died", "loaded": []}})
print(json.dumps(results))
"""


def loaded_by_each(probes: list[tuple[list[str], tuple[str, ...]]], preload: tuple[str, ...] = ()) -> list[tuple]:
    """Run run_pipeline.main(argv) for each (argv, heavy) in a child of one fresh interpreter that
    imported only run_pipeline and `preload`; [(exit code, modules of heavy it holds afterwards)]."""
    script = PROBE.format(root=str(ROOT), probes=probes, preload=preload)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return [(r["code"], set(r["loaded"])) for r in json.loads(out.stdout.strip().splitlines()[-1])]


def loaded_by(argv: list[str], heavy: tuple[str, ...] = HEAVY) -> tuple[int, set[str]]:
    """run_pipeline.main(argv) in a fresh interpreter; (exit code, heavy modules it imported)."""
    return loaded_by_each([(argv, heavy)])[0]


def test_help_and_config_errors_answer_before_torch_is_imported(params_file):
    helped, bad_value, bad_stage = loaded_by_each([
        (["--help"], HEAVY),
        (["head", "--params", str(params_file), "--set", "head.lr=-1"], HEAVY),
        (["nosuchstage", "--params", str(params_file)], HEAVY)])
    assert helped == (0, set())
    assert bad_value == (2, set())
    assert bad_stage == (2, set())


def test_each_stage_imports_only_what_it_uses(params_file, tiny_cfg, tmp_path):
    """Torch is preloaded (every command here needs it): the probes tell the other libraries apart.

    - head / logistic on a cache file alone (features.file);
    - a warm head on the image tree: with data.root (the freshness check stats the images), a cache hit
      of a Lite backbone (the default family; a torchvision model needs torchvision to resolve its
      preprocessing) needs no torchvision;
    - torchvision backbones: timm and safetensors are imported only for a timm/<model> name or a
      .safetensors weights file (a fresh cache folder, so that extract builds the feature extractor).
    """
    from pipeline.extract import run_extract

    cache_file = run_extract(tiny_cfg(), torch.device("cpu"))["cache_file"]
    lite = ["backbone.name=efficientnet_lite0", "backbone.weights=none"]
    run_extract(tiny_cfg(*lite), torch.device("cpu"))
    params = ["--params", str(params_file)]
    base = params + ["--set", f"features.file={cache_file}"]
    lite_sets = [a for s in lite + ["report.enabled=true"] for a in ("--set", s)]
    head, logistic, reported, warm, torchvision_only = loaded_by_each([
        (["head"] + base, HEAVY),
        (["logistic"] + base, HEAVY),
        (["head"] + base + ["--set", "report.enabled=true"], HEAVY),
        (["head"] + params + lite_sets, HEAVY + ("torch._dynamo",)),
        (["extract", "finetune"] + params + ["--set", f"extract.cache_dir={tmp_path / 'cache-tv'}"],
         ("torchvision", "timm", "safetensors")),
    ], preload=("torch",))
    code, head = head
    assert code == 0 and head == {"torch", "h5py"}  # no torchvision, scikit-learn, matplotlib or Pillow
    code, logistic = logistic
    assert code == 0 and logistic == {"torch", "h5py", "sklearn"}
    # reports are drawn after the model is saved: matplotlib, but neither scikit-learn nor torchvision
    code, reported = reported
    assert code == 0 and "matplotlib" in reported and not {"sklearn", "torchvision"} & reported
    # nor torch._dynamo: the heads' SGD (pipeline/sgd.py) spares the import the first torch.optim step makes
    code, warm = warm
    assert code == 0 and not {"torchvision", "sklearn", "torch._dynamo"} & warm
    # this extraction builds resnet18's feature extractor: also what tests/test_timm_backbones.py checked
    # in a process of its own (resolve_backbone + build_feature_extractor import no timm)
    code, loaded = torchvision_only
    assert code == 0 and loaded == {"torchvision"}
