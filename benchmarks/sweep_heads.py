"""Head zoo speed on cached features: one linear head, 24 joint linear heads, a 60+ configuration sweep.

    python benchmarks/sweep_heads.py --cli            # the CLI, fresh processes: `sweep` (72 configs) vs `head`
    python benchmarks/sweep_heads.py [--cache cache/<key>.h5] [--threads 1] [--out runs/sweep_bench] [--pairs 7]

--cli: on the digits demo (`--set data.root=demo:digits`, extracted first if needed, not timed), times
`run_pipeline.py head` (warm cache, fresh process, start-up included) before and after
`run_pipeline.py sweep` with the 72-configuration grid below (48 linear, 16 kNN, 2 NCM, 4 logistic C,
2 MLP; fresh process), and prints the ratio of the sweep to the mean of the two head runs.

Without --cli: reads the cache with h5py (train/features, train/labels, val/features, val/labels),
then times, in this one process and one after another: one 25-epoch linear head with the head
stage's defaults as the head stage trains it in memory (pipeline.head.train_linear_batched: joint.py
with one head, on lazy_sgd's windows), as a probe from Python (build_probe("linear").fit, which the
API's LinearHead calls: the same engine), through its engine loop (pipeline.head.train_head: streamed,
views, classifier) and through the reference loop (pipeline.probes.fit_module: nn.Linear, autograd,
torch.optim's SGD update), 24 linear heads trained jointly (6 lr x 4 weight_decay), and the sweep
below (pipeline.sweep), printing each wall time and its ratio to BOTH the head stage's linear head
and the reference's, then the sweep's seconds by head type (a jointly trained group's seconds are
shared out evenly among its configurations: the linear heads, the MLPs, the kNN and the NCM configs).
Imports, the cache read and a 2-epoch warm-up head (torch's first-call costs, which the first timed
run would otherwise pay) are not timed. With --out it also writes sweep.json/md/png there.
With --pairs N it then times N alternating pairs (one head through the probe path, then the 24 joint
heads) and prints each pair's ratio, their median and range: one pair on a shared machine can land
either side of a goal. The load average is printed at the start and the end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
import h5py
import numpy as np
import torch

from _common import table, timed_process
from pipeline.joint import train_linear_heads
from pipeline.probes import LinearConfig, build_probe, fit_module
from pipeline.sweep import expand_grid, run_sweep
from pipeline.sweep_report import format_leaderboard, write_sweep_reports

LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
WEIGHT_DECAYS = [0.0, 1e-4, 1e-3, 1e-2]
SWEEP_GRID = {
    "linear": {"lr": LRS, "weight_decay": WEIGHT_DECAYS},                       # 24, one joint run
    "knn": {"k": [5, 10, 20, 50], "temperature": [0.03, 0.07, 0.1, 0.2]},      # 16
    "ncm": {"temperature": [0.03, 0.07]},                                      # 2
    "logistic": {"C": [0.01, 0.1, 1.0, 10.0]},                                  # 4
    "mlp": {"hidden": [256, 512], "lr": [1e-3]},                               # 2
}
EXTRA_LINEAR = {"lr": LRS, "weight_decay": WEIGHT_DECAYS, "momentum": [0.0]}   # 24 more, same joint group
# The same 72 configurations as one sweep.grid for the CLI (momentum 0.9 is the head.* default).
CLI_GRID = {**SWEEP_GRID, "linear": {"lr": LRS, "weight_decay": WEIGHT_DECAYS, "momentum": [0.9, 0.0]}}


def load_text() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def cli_comparison() -> None:
    """`sweep` of CLI_GRID vs a warm `head`, each a fresh process, on the digits demo."""
    out = Path(tempfile.mkdtemp(prefix="sweep_bench_"))

    def cli(stage: str, *sets: str) -> tuple[float, str]:
        extra = ["data.root=demo:digits", f"run.output_dir={out}", "run.name=bench", "report.enabled=false", *sets]
        return timed_process([sys.executable, "run_pipeline.py", stage] + [a for s in extra for a in ("--set", s)])

    print(f"start: {load_text()}; run folders in {out}")
    t_extract, _ = cli("extract")
    print(f"extract (not part of the comparison): {t_extract:.1f} s")
    t_head1, _ = cli("head")
    t_sweep, text = cli("sweep", f"sweep.grid={json.dumps(CLI_GRID)}")
    t_head2, _ = cli("head")
    head = (t_head1 + t_head2) / 2
    summary = json.loads((out / "bench" / "sweep.json").read_text())
    print(table([("head (warm cache, fresh process), mean of 2", f"{head:.2f}", "1.00",
                  f"{t_head1:.2f} before, {t_head2:.2f} after"),
                 (f"sweep of {summary['finished']} configurations (fresh process)", f"{t_sweep:.2f}",
                  f"{t_sweep / head:.2f}", f"winner val top-1 {summary['winner']['val_acc']:.4f}")],
                ("run", "seconds", "x one head run", "notes")))
    per_type: dict = {}
    for r in summary["results"]:
        per_type[r["head_type"]] = per_type.get(r["head_type"], 0.0) + r["seconds"]
    print("sweep seconds by head type: " + ", ".join(f"{t} {s:.2f}" for t, s in per_type.items()))
    print(f"end: {load_text()}")


def newest_cache(folder: Path) -> Path:
    files = sorted((p for p in folder.glob("*.h5") if not p.name.startswith("scan-")), key=os.path.getmtime)
    if not files:
        raise SystemExit(f"no cache in {folder}: run `python run_pipeline.py extract --set report.enabled=false`")
    return files[-1]


def load(path: Path):
    with h5py.File(path, "r") as f:
        return tuple(f[k][()] for k in ("train/features", "train/labels", "val/features", "val/labels"))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def pair_ratios(X, y, Xv, yv, grid: list, pairs: int) -> str:
    """Time `pairs` alternating (one probe-path head, the grid's joint heads) pairs: each ratio, median, range."""
    ratios = []
    for _ in range(pairs):
        _, t_one = timed(lambda: build_probe("linear").fit(X, y, Xv, yv))
        _, t_joint = timed(lambda: train_linear_heads(X, y, Xv, yv, grid))
        ratios.append(t_joint / t_one)
    return (f"{len(grid)} joint heads / one head, {pairs} alternating pairs: "
            + " ".join(f"{r:.2f}" for r in ratios)
            + f"; median {_common.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="HDF5 feature cache (default: newest in cache/)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default 0: torch's own)")
    parser.add_argument("--out", type=Path, default=None, help="also write sweep.json/md/png here (default: none)")
    parser.add_argument("--pairs", type=int, default=0, help="then time this many alternating (one head, "
                        "24 joint heads) pairs and print their ratios' median (default 0: none)")
    parser.add_argument("--cli", action="store_true", help="time the CLI's sweep against its head instead "
                        "(fresh processes, digits demo; default: the in-process timings)")
    args = parser.parse_args()
    if args.cli:
        return cli_comparison()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.cache or newest_cache(_common.REPO / "cache")
    X, y, Xv, yv = load(path)
    print(f"{path.name}: train {X.shape}, val {Xv.shape}, {len(np.unique(y))} classes; "
          f"torch threads {torch.get_num_threads()}; {load_text()}")

    from pipeline.config import HeadConfig
    from pipeline.head import train_head, train_linear_batched

    tx, ty, tvx, tvy = (torch.from_numpy(np.ascontiguousarray(a)) for a in (X, y, Xv, yv))
    n, cpu = len(np.unique(y)), torch.device("cpu")
    train_linear_heads(X, y, Xv, yv, [LinearConfig(epochs=2)])      # untimed: torch's first-call costs
    stage, t_stage = timed(lambda: train_linear_batched(tx, ty, tvx, tvy, n, HeadConfig(), cpu, 0, 0))
    engine, t_engine = timed(lambda: train_head(tx, ty, tvx, tvy, n, HeadConfig(), cpu, 0))
    probe, t_probe = timed(lambda: build_probe("linear").fit(X, y, Xv, yv))
    reference = build_probe("linear")
    reference.trainer = lambda: fit_module                               # the autograd loop, not joint.py
    one, t_one = timed(lambda: reference.fit(X, y, Xv, yv))
    grid = [LinearConfig(lr=lr, weight_decay=wd) for lr in LRS for wd in WEIGHT_DECAYS]
    joint, t_joint = timed(lambda: train_linear_heads(X, y, Xv, yv, grid))
    configs = expand_grid(SWEEP_GRID)
    configs += [c for c in expand_grid({"linear": EXTRA_LINEAR}) if c not in configs]
    kinds = {t: sum(c.head_type == t for c in configs) for t in SWEEP_GRID}
    outcome, t_sweep = timed(lambda: run_sweep(configs, X, y, Xv, yv))

    def row(name, seconds, acc):
        return name, f"{seconds:.2f}", f"{seconds / t_stage:.2f}", f"{seconds / t_one:.2f}", f"{acc:.4f}"

    print(table([row("one linear head, the head stage's trainer (head.train_linear_batched: joint.py, lazy_sgd)",
                     t_stage, stage.best_acc),
                 row("one linear head, the probe / API path (build_probe('linear').fit, api.LinearHead)", t_probe,
                     probe.result.best_acc),
                 row("one linear head, the engine loop (head.train_head: autograd, streamed batches)", t_engine,
                     engine.best_acc),
                 row("one linear head, the reference (probes.fit_module: nn.Linear, autograd, torch.optim's "
                     "SGD update)", t_one, one.result.best_acc),
                 row("24 linear heads, jointly (joint.train_linear_heads)", t_joint,
                     max(r.best_acc for r in joint.results)),
                 row(f"sweep of {len(configs)} configs ({', '.join(f'{n} {t}' for t, n in kinds.items())})",
                     t_sweep, outcome.winner.val_acc)],
                ("run", "seconds", "x head stage's head", "x reference head", "best val top-1")))
    per_type = {}
    for r in outcome.results:
        per_type[r.head_type] = per_type.get(r.head_type, 0.0) + r.seconds
    print("sweep seconds by head type: " + ", ".join(f"{t} {s:.2f}" for t, s in per_type.items()))
    print(format_leaderboard(outcome, top=10))
    if args.pairs:
        print(pair_ratios(X, y, Xv, yv, grid, args.pairs))
    print(f"end: {load_text()}")
    if args.out:
        for p in write_sweep_reports(outcome, args.out, grid={**SWEEP_GRID, "linear (extra)": EXTRA_LINEAR}):
            print(f"wrote {p}")


if __name__ == "__main__":
    main()
