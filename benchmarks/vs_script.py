"""The pipeline's price for its guarantees: against the shortest honest in-memory script.

    python benchmarks/vs_script.py [--data demo:digits] [--repeat 1]

Same data, backbone, preprocessing, batch size, loader workers and C grid, each side a fresh process
(start-up and imports included), one run:

1. script: benchmarks/plain_script.py: ImageFolder -> frozen backbone -> GridSearchCV(LogisticRegression);
2. pipeline, first run: `run_pipeline.py extract logistic` on an empty cache (pre-scan, hashing,
   crash-safe HDF5 chunks, verification) with report.enabled=false (the script draws nothing);
3. pipeline, warm run: `run_pipeline.py logistic` again: the cache is hit, no image is decoded.

Prints wall seconds, val accuracies and the ratios to the script (goals: first run <= 1.15, warm <= 0.1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)

from _common import REPO, table, timed_process
from pipeline.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.json"), help="params file (default params.json)")
    parser.add_argument("--data", default=None, help="data.root override (default: the params file's)")
    parser.add_argument("--repeat", type=int, default=1, help="best of N runs of each side, interleaved (default 1)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vs_script-"))
    sets = [f"run.output_dir={work / 'runs'}", "run.name=bench", "report.enabled=false"] + (
        [f"data.root={args.data}"] if args.data else [])
    cfg = load_config(args.params, sets)
    size = cfg.backbone.image_size or 0
    if not size:
        from pipeline.backbones import resolve_backbone
        size = resolve_backbone(cfg.backbone, cfg.run.seed).preprocess.crop_size
    print(f"data {cfg.data.root}, {cfg.backbone.name} at {size} px, batch {cfg.extract.batch_size}, "
          f"{cfg.data.num_workers} loader worker(s), C grid {cfg.logistic.c_grid}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    script = [sys.executable, str(REPO / "benchmarks" / "plain_script.py"), cfg.data.root, cfg.backbone.name,
              str(size), str(cfg.extract.batch_size), str(cfg.data.num_workers)]
    times = {"script": [], "first": [], "warm": []}
    for run in range(args.repeat):  # interleaved so that every side sees the same machine
        cli = [sys.executable, str(REPO / "run_pipeline.py"), "--params", args.params] + [
            a for s in sets + [f"extract.cache_dir={work / f'cache{run}'}"] for a in ("--set", s)]
        seconds, out = timed_process(script)
        times["script"].append(seconds)
        script_acc = out.split()[1]
        seconds, _ = timed_process(cli + ["extract", "logistic"])
        times["first"].append(seconds)
        seconds, out = timed_process(cli + ["logistic"])
        if "cache hit" not in out:
            sys.exit("the warm run did not hit the cache")
        times["warm"].append(seconds)
    metrics = json.loads((work / "runs" / "bench" / "metrics.json").read_text())
    base = min(times["script"])
    rows = [("plain script", f"{base:.1f}", script_acc, "1.00", ""),
            ("pipeline first run", f"{min(times['first']):.1f}", f"{metrics['logistic']['val_acc']:.4f}",
             f"{min(times['first']) / base:.2f}", "<= 1.15"),
            ("pipeline warm run", f"{min(times['warm']):.1f}", f"{metrics['logistic']['val_acc']:.4f}",
             f"{min(times['warm']) / base:.2f}", "<= 0.10")]
    print(table(rows, ("side", "wall s", "val acc", "ratio to script", "goal")))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
