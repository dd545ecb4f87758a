"""This pipeline against the PyTorch transfer-learning tutorial's fixed-feature-extractor loop.

    python benchmarks/vs_tutorial.py [--data demo:digits] [--epochs 25]

Same data, same backbone (EfficientNet-Lite0 by default), same preprocessing, same machine, one run:

1. tutorial: the loop from the PyTorch tutorial "ConvNet as fixed feature extractor": backbone
   frozen, classifier replaced, the backbone recomputed every epoch on augmented train crops
   (RandomResizedCrop + flip) and on val, SGD(lr 0.001, momentum 0.9) + StepLR(7, 0.1), batch 4,
   `--epochs` epochs (25 in the tutorial), best val accuracy kept;
2. pipeline, first run: `run_pipeline.py extract head logistic` in a fresh process on an empty cache;
3. pipeline, warm cache: `run_pipeline.py head` again in a fresh process (start-up included),
   `--warm-runs` times, alternating with the same run under `report.enabled=false` (no PNGs);
   the median of each is the figure, the range is printed beside it with the load average;
4. with `--views K` (K > 0): extract + head again with an augmented-view bank of K train views.

Prints wall times, best val accuracies and the ratios.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
import torch
from torch import nn
from torch.utils.data import DataLoader

from _common import REPO, table, timed_process
from pipeline.backbones import build_network, replace_classifier, resolve_backbone, classifier_path
from pipeline.config import load_config
from pipeline.data import ImageListDataset, eval_transform, load_image_folder, train_transform


def tutorial_fixed_feature_extractor(cfg, epochs: int, batch_size: int = 4) -> dict:
    """The tutorial's train_model() with a frozen backbone, reproduced faithfully on this data."""
    torch.manual_seed(cfg.run.seed)
    data = load_image_folder(cfg.data.root)
    spec = resolve_backbone(cfg.backbone, cfg.run.seed)
    model = build_network(cfg.backbone, spec)
    for param in model.parameters():
        param.requires_grad = False
    model = replace_classifier(cfg.backbone.name, model, len(data.classes))  # new layer: trainable
    fc = model.get_submodule(classifier_path(cfg.backbone.name, model))
    loaders = {
        "train": DataLoader(ImageListDataset(data.root, data.train, train_transform(spec.preprocess)),
                            batch_size=batch_size, shuffle=True, num_workers=cfg.data.num_workers),
        "val": DataLoader(ImageListDataset(data.root, data.val, eval_transform(spec.preprocess)),
                          batch_size=batch_size, shuffle=False, num_workers=cfg.data.num_workers),
    }
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(fc.parameters(), lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    best_acc, best_state, history = 0.0, None, []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        for phase in ("train", "val"):  # the tutorial's own shape, kept on purpose
            model.train() if phase == "train" else model.eval()
            correct = 0
            for inputs, labels in loaders[phase]:
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                correct += (outputs.argmax(1) == labels).sum().item()
            if phase == "train":
                scheduler.step()
            else:
                acc = correct / len(loaders["val"].dataset)
                history.append(acc)
                if acc > best_acc:
                    best_acc, best_state = acc, copy.deepcopy(model.state_dict())
        print(f"  tutorial epoch {epoch + 1}/{epochs}: val_acc {history[-1]:.4f} "
              f"({time.perf_counter() - t0:.0f} s so far)", flush=True)
    return {"seconds": time.perf_counter() - t0, "best_val_acc": best_acc, "history": history}


def run_cli(args: list[str]) -> tuple[float, str]:
    """Run run_pipeline.py in a fresh process; return (wall seconds incl. start-up, stdout)."""
    return timed_process([sys.executable, str(REPO / "run_pipeline.py"), *args])


def warm_heads(cli: list[str], runs: int, runs_dir: Path, extract_entry: dict) -> dict:
    """Wall seconds of `runs` warm head processes with reports and as many without, alternating (each
    pair sees the same load); exits if one of them did not hit the cache."""
    seconds: dict[str, list[float]] = {"reports": [], "no_reports": []}
    load = [os.getloadavg()[0]]
    for _ in range(runs):
        for kind, extra in (("reports", []), ("no_reports", ["--set", "report.enabled=false"])):
            wall, out = run_cli(["head"] + cli + extra)
            warm = json.loads((runs_dir / "bench" / "metrics.json").read_text())
            if "cache hit" not in out or warm["extract"] != extract_entry:
                sys.exit("the warm-cache head run did not hit the cache")
            seconds[kind].append(wall)
    load.append(os.getloadavg()[0])
    return {**seconds, "val_acc": warm["head"]["val_acc"], "load": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.json"), help="params file (default params.json)")
    parser.add_argument("--data", default=None, help="data.root override (default: the params file's)")
    parser.add_argument("--epochs", type=int, default=25, help="tutorial and head epochs (default 25)")
    parser.add_argument("--views", type=int, default=0,
                        help="also run the pipeline with an augmented-view bank of K views (default 0: skip)")
    parser.add_argument("--warm-runs", type=int, default=3,
                        help="warm head processes timed with reports, and as many without (default 3)")
    parser.add_argument("--output", default=None, help="write the figures as JSON here (default: no file)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vs_tutorial-"))
    sets = [f"extract.cache_dir={work / 'cache'}", f"run.output_dir={work / 'runs'}", "run.name=bench",
            f"head.epochs={args.epochs}"] + ([f"data.root={args.data}"] if args.data else [])
    cfg = load_config(args.params, sets)
    print(f"data {cfg.data.root}, backbone {cfg.backbone.name} at {cfg.backbone.image_size} px, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, work dir {work}")
    cli = ["--params", args.params] + [a for s in sets for a in ("--set", s)]

    print("pipeline, first run (extract + head + logistic, fresh process, empty cache) ...", flush=True)
    first_s, _ = run_cli(["extract", "head", "logistic"] + cli)
    metrics = json.loads((work / "runs" / "bench" / "metrics.json").read_text())
    extract_entry = metrics["extract"]
    print(f"pipeline, warm cache (head only, fresh processes, {args.warm_runs} with reports and "
          f"{args.warm_runs} without) ...", flush=True)
    warm = warm_heads(cli, max(1, args.warm_runs), work / "runs", extract_entry)
    warm_s, bare_s = statistics.median(warm["reports"]), statistics.median(warm["no_reports"])
    views = None
    if args.views:
        print(f"pipeline with a {args.views}-view augmented bank (extract + head) ...", flush=True)
        vsets = cli + ["--set", f"extract.train_views={args.views}", "--set", "run.name=bench_views"]
        views_s, _ = run_cli(["extract", "head"] + vsets)
        vm = json.loads((work / "runs" / "bench_views" / "metrics.json").read_text())
        views = {"seconds": views_s, "head_val_acc": vm["head"]["val_acc"]}

    print(f"tutorial loop ({args.epochs} epochs, batch 4, backbone recomputed every epoch) ...", flush=True)
    tut_cfg = load_config(args.params, [s for s in sets if s.startswith("data.")])
    tutorial = tutorial_fixed_feature_extractor(tut_cfg, args.epochs)

    best_pipeline = max(metrics["head"]["val_acc"], metrics["logistic"]["val_acc"])
    rows = [("tutorial loop", f"{tutorial['seconds']:.1f}", f"{tutorial['best_val_acc']:.4f}", "1.0"),
            ("pipeline first run", f"{first_s:.1f}",
             f"{best_pipeline:.4f} (head {metrics['head']['val_acc']:.4f}, logistic {metrics['logistic']['val_acc']:.4f})",
             f"{tutorial['seconds'] / first_s:.1f}"),
            (f"pipeline warm head (median; {spread(warm['reports'])})", f"{warm_s:.2f}", f"{warm['val_acc']:.4f}",
             f"{tutorial['seconds'] / warm_s:.1f}"),
            (f"  same, report.enabled=false ({spread(warm['no_reports'])})", f"{bare_s:.2f}",
             f"{warm['val_acc']:.4f}", f"{tutorial['seconds'] / bare_s:.1f}")]
    if views:
        rows.append((f"pipeline {args.views}-view bank", f"{views['seconds']:.1f}", f"{views['head_val_acc']:.4f}",
                     f"{tutorial['seconds'] / views['seconds']:.1f}"))
    print()
    print(table(rows, ("method", "wall s", "best val acc", "speed-up vs tutorial")))
    print(f"\nextraction: {extract_entry['images']} images at {extract_entry['images_per_second']:.1f} img/s; "
          f"warm runs: cache hit, 0 backbone forward passes; load average {warm['load'][0]:.1f} -> "
          f"{warm['load'][1]:.1f} over them")
    if args.output:
        Path(args.output).write_text(json.dumps({"tutorial": tutorial, "first_run_seconds": first_s,
                                                 "warm_head_seconds": warm_s, "warm_head": warm, "metrics": metrics,
                                                 "views": views}, indent=2))


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f} s over {len(values)}" if len(values) > 1 else "1 run"


if __name__ == "__main__":
    main()
