"""Building a backbone from downloaded weights: the library's own builder against the pipeline's, in turns.

    python benchmarks/backbone_build.py [--models resnet50 vit_b_16 timm/vit_base_patch16_224.augreg2_in21k_ft_in1k ...]

No network: for each model a checkpoint of its architecture (random values) is written where the builder
looks for its DEFAULT weights, torch.hub's folder (a temporary TORCH_HOME) for torchvision and, for timm,
a file that timm's Hub download is made to return. Then, round after round, the model is built by
torchvision's `get_model(weights=DEFAULT)` or timm's `create_model(pretrained=True)` (random init, then
the checkpoint copied in) and by `pipeline.backbones.build_network` (the builder on the meta device, its
own load assigning the checkpoint: weight_files.build_hub_loaded); best round of each, and their ratio.
The two networks' state dicts are checked equal.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
import torch

from _common import table

DEFAULT_MODELS = ["resnet50", "densenet121", "efficientnet_v2_s", "vit_b_16", "vit_l_16",
                  "timm/resnet50.a1_in1k", "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
                  "timm/vit_large_patch16_224.augreg_in21k_ft_in1k", "timm/swin_tiny_patch4_window7_224.ms_in1k"]


def torchvision_builders(name: str, folder: Path):
    import torchvision

    from pipeline.weight_files import hub_file

    os.environ["TORCH_HOME"] = str(folder / "torch_home")
    enum = torchvision.models.get_model_weights(name).DEFAULT
    path = hub_file(enum)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.get_model(name).state_dict(), path)
    return lambda: torchvision.models.get_model(name, weights=enum)


def timm_builders(name: str, folder: Path, files: dict):
    import safetensors.torch
    import timm
    import timm.models._hub as timm_hub

    from pipeline import timm_backbones

    model = name[len("timm/"):]
    path = folder / f"{model}.safetensors"
    state = timm.create_model(model.split(".")[0]).state_dict()
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    files[timm.models.get_pretrained_cfg(model).hf_hub_id] = str(path)
    timm_hub.hf_hub_download = lambda repo_id, filename=None, **kwargs: files[repo_id]
    timm_backbones._hub_cached = lambda repo_id: files.get(repo_id)
    return lambda: timm.create_model(model, pretrained=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                        help="torchvision names and timm/<model>.<tag> names (default: nine from both)")
    parser.add_argument("--rounds", type=int, default=3, help="builds of each, in turns (default: 3)")
    args = parser.parse_args()
    from pipeline import backbones
    from pipeline.backbones import build_network, resolve_backbone
    from pipeline.config import BackboneConfig

    backbones.check_hub_file = lambda enum: None   # the checkpoints written here do not have the published hash

    print(f"load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}; torch threads {torch.get_num_threads()}")
    rows, files = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            theirs = (timm_builders(name, Path(tmp), files) if name.startswith("timm/")
                      else torchvision_builders(name, Path(tmp)))
            cfg = BackboneConfig(name=name, weights="DEFAULT")
            spec = resolve_backbone(cfg, seed=0)
            ours = lambda: build_network(cfg, spec)   # noqa: E731
            a, b = ours(), theirs()
            same = a.state_dict().keys() == b.state_dict().keys() and all(
                torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
            del a, b
            times = {"theirs": [], "ours": []}
            for _ in range(args.rounds):
                for label, fn in (("theirs", theirs), ("ours", ours)):
                    t0 = time.perf_counter()
                    fn()
                    times[label].append(time.perf_counter() - t0)
            t_theirs, t_ours = min(times["theirs"]), min(times["ours"])
            rows.append((name, f"{t_theirs:.2f}", f"{t_ours:.2f}", f"{t_theirs / t_ours:.1f}x", "yes" if same else "NO"))
            for f in Path(tmp).rglob("*"):
                if f.is_file():
                    f.unlink()
    print(table(rows, ("model", "library's builder s", "pipeline s", "speed-up", "same state dict")))
    print(f"load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
