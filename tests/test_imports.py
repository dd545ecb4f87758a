"""Lean processes: each stage imports only the libraries it uses (a fresh process per stage)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# torch._dynamo is left out: torch.optim imports it on its own (first optimizer step)
HEAVY = ("torch", "torchvision", "sklearn", "matplotlib", "PIL.Image", "h5py")
PROBE = """
import json, sys
sys.path.insert(0, {root!r})
import run_pipeline
try:
    code = run_pipeline.main({argv!r})
except SystemExit as e:
    code = e.code
print(json.dumps({{"code": code, "loaded": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def loaded_by(argv: list[str], heavy: tuple[str, ...] = HEAVY) -> tuple[int, set[str]]:
    """Run run_pipeline.main(argv) in a fresh interpreter; (exit code, heavy modules it imported)."""
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), argv=argv, heavy=heavy)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["code"], set(result["loaded"])


def test_help_and_config_errors_answer_before_torch_is_imported(params_file):
    assert loaded_by(["--help"]) == (0, set())
    code, loaded = loaded_by(["head", "--params", str(params_file), "--set", "head.lr=-1"])
    assert code == 2 and loaded == set()
    code, loaded = loaded_by(["nosuchstage", "--params", str(params_file)])
    assert code == 2 and loaded == set()


@pytest.fixture
def cache_file(tiny_cfg) -> str:
    from pipeline.extract import run_extract

    return run_extract(tiny_cfg(), torch.device("cpu"))["cache_file"]


def test_each_stage_on_a_cache_file_imports_only_what_it_uses(params_file, cache_file):
    base = ["--params", str(params_file), "--set", f"features.file={cache_file}"]
    code, head = loaded_by(["head"] + base)
    assert code == 0 and head == {"torch", "h5py"}  # no torchvision, scikit-learn, matplotlib or Pillow
    code, logistic = loaded_by(["logistic"] + base)
    assert code == 0 and logistic == {"torch", "h5py", "sklearn"}
    # reports are drawn after the model is saved: matplotlib, but neither scikit-learn nor torchvision
    code, reported = loaded_by(["head"] + base + ["--set", "report.enabled=true"])
    assert code == 0 and "matplotlib" in reported and not {"sklearn", "torchvision"} & reported


def test_a_warm_head_on_the_image_tree_imports_no_torchvision(params_file, tiny_cfg):
    """With data.root (the freshness check stats the images), a cache hit of a Lite backbone (the
    default family; a torchvision model needs torchvision to resolve its preprocessing) needs none."""
    from pipeline.extract import run_extract

    lite = ["backbone.name=efficientnet_lite0", "backbone.weights=none"]
    run_extract(tiny_cfg(*lite), torch.device("cpu"))
    sets = [a for s in lite + ["report.enabled=true"] for a in ("--set", s)]
    code, head = loaded_by(["head", "--params", str(params_file)] + sets, HEAVY + ("torch._dynamo",))
    # nor torch._dynamo: the heads' SGD (pipeline/sgd.py) spares the import the first torch.optim step makes
    assert code == 0 and not {"torchvision", "sklearn", "torch._dynamo"} & head



def test_torchvision_backbones_import_neither_timm_nor_safetensors(params_file):
    """timm and safetensors are imported only for a timm/<model> name or a .safetensors weights file."""
    code, loaded = loaded_by(["extract", "finetune", "--params", str(params_file)],
                             ("torchvision", "timm", "safetensors"))
    assert code == 0 and loaded == {"torchvision"}
