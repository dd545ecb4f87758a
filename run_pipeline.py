#!/usr/bin/env python
"""Run the transfer-learning pipeline, or any of its stages, from one params file.

    python run_pipeline.py                      # the stages listed in run.stages
    python run_pipeline.py extract head         # just these
    python run_pipeline.py benchmark            # cached heads vs finetuning: table, JSON, chart
    python run_pipeline.py sweep                # the heads of sweep.grid from one read of the cache
    python run_pipeline.py leaderboard [--all]  # the best heads trained on this cache (every cache)
    python run_pipeline.py predict img.jpg photos/ --output preds.csv
    python run_pipeline.py --set data.root=/data/hymenoptera --set backbone.name=resnet18
    torchrun --nproc_per_node=4 run_pipeline.py extract finetune   # one process per GPU (or CPU share)
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

STAGE_HELP = {
    "extract": "run the frozen backbone once over every image; write the HDF5 feature cache",
    "head": "train a head (head.type: linear, mlp, knn, ncm, or VGG/AlexNet's own dense layers) from the cache",
    "logistic": "scikit-learn logistic regression (C by cross-validation) from the cache; write reports",
    "finetune": "train the whole network on the images (skips the cache); write reports",
    "sweep": "train every head of sweep.grid from one read of the cache; leaderboard, sweep.json/md (and "
             "sweep.png with report.enabled); the winner becomes head.pt",
    "leaderboard": "the best heads trained on the current cache, from run.output_dir/ledger.jsonl (--all: "
                   "every cache)",
    "benchmark": "extract + head + logistic vs finetune on the same data and seed: benchmark.md/.json/.png",
    "report": "redraw confusion matrices, per-class reports, curves and prediction grids from saved models, "
              "and sweep.png from sweep.json",
    "predict": "predict PATH [PATH ...]: classify image files or folders with a saved model (predict.model); "
               "a labelled folder (<class>/*.jpg) also gets top-1, mean per-class and the most confused pairs",
    "caches": "list the feature cache files in extract.cache_dir: data root, backbone, images, size, date (on its own)",
}
COMMANDS = ("caches",)  # not stages: they read, and need neither torch nor a run folder
# Under torchrun these run on every rank; the others run on rank 0 while the rest wait.
DISTRIBUTED_STAGES = ("extract", "finetune")


def get_args_parser() -> argparse.ArgumentParser:
    from pipeline.config import describe_keys

    width = max(map(len, STAGE_HELP))
    stages = "\n".join(f"  {name:<{width}} {text}" for name, text in STAGE_HELP.items())
    parser = argparse.ArgumentParser(
        description="Feature-caching transfer learning: extract once, train many heads.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"stages:\n{stages}\n\nparams keys (--set section.key=value):\n{describe_keys()}")
    parser.add_argument("stages", nargs="*", metavar="STAGE",
                        help="stages to run (default: run.stages from the params file); "
                             "'predict' takes the image files and folders that follow it")
    parser.add_argument("--params", default=None,
                        help="params JSON file (default: ./params.json if there is one, else the built-in defaults, "
                             "which the repository's params.json copies)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one params key; repeatable (default: none)")
    parser.add_argument("--trust", action="store_true",
                        help="load model files whose SHA-256 is not recorded in their run folder; they can run "
                             "code when loaded (default: refuse them); same as --set run.trust_artifacts=true")
    parser.add_argument("--all", action="store_true",
                        help="leaderboard: list every cache in the ledger, not just the current one "
                             "(default: the current cache); same as --set leaderboard.all=true")
    parser.add_argument("--output", metavar="CSV", default=None,
                        help="predict: also write the predictions to this CSV file (default: print only)")
    return parser


def split_stages(tokens: list[str]) -> tuple[list[str], list[str]]:
    """(stages, image paths): everything after 'predict' is a path to classify."""
    if "predict" in tokens:
        i = tokens.index("predict")
        return tokens[:i + 1], tokens[i + 1:]
    return tokens, []


def check_command(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(stages, image paths) named on the command line; ConfigError for a combination that cannot run."""
    from pipeline.config import STAGES, ConfigError, did_you_mean

    stages, paths = split_stages(args.stages)
    unknown = [s for s in stages if s not in STAGES + COMMANDS]
    if unknown:
        raise ConfigError(f"unknown stage '{unknown[0]}'{did_you_mean(unknown[0], STAGES + COMMANDS)} "
                          f"(stages: {', '.join(STAGES + COMMANDS)})")
    if any(s in COMMANDS for s in stages) and len(stages) > 1:
        raise ConfigError("'caches' runs on its own: python run_pipeline.py caches [--set extract.cache_dir=DIR]")
    if "predict" in stages and not paths:
        raise ConfigError("predict needs image files or folders after it: "
                          "python run_pipeline.py predict IMG_OR_FOLDER [...] [--output preds.csv]")
    if args.output and "predict" not in stages:
        raise ConfigError("--output is for the predict stage: python run_pipeline.py predict IMG --output preds.csv")
    return stages, paths


def start_processes(cfg, stages: list[str], lock: contextlib.ExitStack):
    """(device, distributed.DistContext): the device and (under torchrun) the process group, made once here;
    rank 0 alone logs and takes the run folder's lock (held in `lock` until main closes it)."""
    import torch  # noqa: F401 - the stages need it; loaded here, once the command and config are checked

    from pipeline import distributed
    from pipeline.runtime import resolve_device

    launch = distributed.launch_from_env()
    device = distributed.rank_device(resolve_device(cfg.run.device), launch)
    dist = distributed.init_distributed(device, cfg.run.dist_timeout_min)
    if not dist.is_main:  # one log: the other ranks keep stderr (errors, warnings) only
        sys.stdout = open(os.devnull, "w", encoding="utf-8")
    if dist.is_main and (any(s not in ("report", "predict", "leaderboard") for s in stages)
                         or ("report" in stages and cfg.run_dir.is_dir())):
        lock_run_folder(cfg, stages, lock)
    if dist.is_distributed:
        print(f"torchrun: {dist.world_size} processes, rank 0 on {distributed.host()} ({device}); distributed "
              f"stages: {', '.join(DISTRIBUTED_STAGES)}; the others run on rank 0")
        if launch.local_rank == 0:  # a demo dataset is written once per node (or once on a shared disk)
            from pipeline.data import resolve_data_root
            resolve_data_root(cfg.data.root)
        dist.barrier()
    return device, dist


def lock_run_folder(cfg, stages: list[str], lock: contextlib.ExitStack) -> None:
    """One process at a time runs stages in a run folder; each stage publishes its model, checksum,
    metrics entry, config.json and reports as one unit (pipeline/rundir.py)."""
    from pipeline.config import DATA_STAGES
    from pipeline.rundir import check_same_data, run_lock

    lock.enter_context(run_lock(cfg.run_dir))
    if any(s in DATA_STAGES for s in stages):
        check_same_data(cfg.run_dir, cfg.data.root)


def run_stages(cfg, device, stages: list[str], paths: list[str], output: str | None, dist=None) -> None:
    """Each stage in turn (under torchrun: the distributed ones on every rank, the others on rank 0),
    then the results table. dist: the distributed.DistContext of start_processes (None: a single process)."""
    from pipeline.distributed import SINGLE
    from pipeline.runtime import apply_stage_threads, seed_everything
    from pipeline.splits import one_leak_warning_per_run

    dist = dist or SINGLE
    t0 = time.perf_counter()
    before = metrics_before(cfg) if dist.is_main else {}
    with one_leak_warning_per_run():  # images in two splits: warned by the first stage that sees the cache
        for stage in stages:
            seed_everything(cfg.run.seed)
            apply_stage_threads(stage, cfg.head.type, cfg.run.num_threads)
            if stage in DISTRIBUTED_STAGES:
                _run_stage(stage, cfg, device, paths, output, dist)
                continue
            if dist.is_main:  # under torchrun the others wait
                _run_stage(stage, cfg, device, paths, output)
            dist.barrier()
    if dist.is_main:
        print_results(cfg, stages, time.perf_counter() - t0, before)


def metrics_before(cfg) -> dict:
    """The run folder's metrics.json as the run starts ({} when none, or damaged: the stage that writes it says so)."""
    from pipeline import PipelineError
    from pipeline.metrics import read_metrics

    try:
        return read_metrics(cfg.run_dir)
    except PipelineError:
        return {}


def print_results(cfg, stages: list[str], seconds: float, before: dict) -> None:
    """The results table of metrics.json, after any training stage; an entry this run left as it was
    (before: metrics.json as the run started) is marked as an earlier run's."""
    from pipeline.config import DATA_STAGES
    from pipeline.metrics import format_results, read_metrics

    if any(s in DATA_STAGES for s in stages):
        metrics = read_metrics(cfg.run_dir)
        earlier = [s for s, m in metrics.items() if before.get(s) == m]
        print(f"\nresults ({cfg.run_dir / 'metrics.json'}, {seconds:.1f} s):")
        print(format_results(metrics, earlier))


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that finish early sleep instead of spinning: on a machine other jobs are using, a
    # spinning thread steals the core its siblings need (a batch-4 head: 10 s spinning, 0.7 s passive,
    # load average 7 on 2 cores). Read once when torch loads OpenMP, so set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = get_args_parser().parse_intermixed_args(argv)
    stdout = sys.stdout
    lock = contextlib.ExitStack()  # the run folder's lock, once the config names the folder

    from pipeline import PipelineError
    from pipeline.config import load_config

    try:
        stages, paths = check_command(args)  # answered before torch is imported, like config errors
        params = args.params or ("params.json" if os.path.isfile("params.json") else None)
        cfg = load_config(params, args.overrides + (["run.trust_artifacts=true"] if args.trust else [])
                          + (["leaderboard.all=true"] if args.all else []))
        if stages == ["caches"]:
            from pipeline.cache.catalog import format_caches, list_caches
            print(format_caches(list_caches(cfg.extract.cache_dir), cfg.extract.cache_dir))
            return 0
        from pipeline.runname import resolve_run_name
        resolve_run_name(cfg)  # run.name null: the data's own folder (and features.file: the file's data)
        stages = stages or cfg.run.stages
        if cfg.run.reuse_memory:
            from pipeline.malloc import reuse_freed_memory
            reuse_freed_memory()  # before torch allocates: large tensors reuse freed memory (pipeline/malloc.py)
        device, dist = start_processes(cfg, stages, lock)
        run_stages(cfg, device, stages, paths, args.output, dist)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # extraction saves its finished chunks first and says how to resume
        print(str(e) or "interrupted", file=sys.stderr)
        return 130
    finally:
        lock.close()
        if "torch" in sys.modules:
            from pipeline.distributed import shutdown
            shutdown()
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout
    return 0


def _run_stage(stage: str, cfg, device, paths: list[str], output: str | None, dist=None) -> None:
    """dist: only the distributed stages take one (the others run as a single process)."""
    if stage == "predict":
        from pipeline.predict import run_predict
        run_predict(cfg, device, paths, output)
    elif dist is not None:
        _runner(stage)(cfg, device, dist)
    else:
        _runner(stage)(cfg, device)


RUNNERS = {"extract": "pipeline.extract", "head": "pipeline.head", "logistic": "pipeline.logistic",
           "finetune": "pipeline.finetune", "benchmark": "pipeline.benchmark", "report": "pipeline.report",
           "sweep": "pipeline.sweep_stage", "leaderboard": "pipeline.leaderboard"}


def _runner(stage: str):
    """The run_<stage>(cfg, device) entry point; only that stage's module is imported (each pulls in
    only the libraries it uses)."""
    import importlib

    return getattr(importlib.import_module(RUNNERS[stage]), f"run_{stage}")


if __name__ == "__main__":
    sys.exit(main())
