"""Stage `benchmark`: cached-feature heads vs finetuning on the same data, backbone and seed.

Per backbone it runs the steps extract (reusing the cache when present), head, logistic and
finetune, each in its own process when benchmark.isolate is true so that the peak memory recorded
is that step's own, and writes benchmark.json, benchmark.md and benchmark.png to the run folder.
The per-backbone run folders (models, metrics.json, reports) are <run folder>/<backbone>/.
"""
from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from pipeline import PipelineError
from pipeline import cache
from pipeline.benchmark_report import (BENCHMARK_MD, markdown_report, markdown_table, memory_note,  # noqa: F401
                                      plural, write_outputs)
from pipeline.config import Config, HeadConfig
from pipeline.fsutil import exit_with_parent
from pipeline.metrics import selected_on, update_metrics
from pipeline.records import StageResult
from pipeline.runtime import apply_stage_threads, environment_info, seed_everything

if TYPE_CHECKING:  # the stage modules are imported lazily, by the step that runs them
    from pipeline.extract import CachePlan, ExtractJob

MIB = 2 ** 20


# ----------------------------------------------------------------------------- arithmetic
def loop_seconds_per_run(epochs: int, pass_seconds: float, head_seconds_per_run: float) -> float:
    """A head run in the feature-extractor loop: the backbone recomputed over train+val every epoch,
    plus the same head updates the cached run does."""
    return epochs * pass_seconds + head_seconds_per_run


def break_even_runs(extract_seconds: float, head_seconds_per_run: float,
                    loop_seconds_per_run: float) -> Optional[int]:
    """How many head-training runs until the one-time extraction has paid for itself.

    The smallest k >= 1 with extract + k * head <= k * loop; None when a cached run saves nothing.
    """
    saving = loop_seconds_per_run - head_seconds_per_run
    if saving <= 0:
        return None
    return max(1, math.ceil(extract_seconds / saving - 1e-9))


def peak_rss_mib() -> Optional[float]:
    """This process's peak resident set size (ru_maxrss), or None where `resource` is missing."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (MIB if sys.platform == "darwin" else 1024), 1)  # bytes on macOS, KiB on Linux


def children_peak_rss_mib() -> Optional[float]:
    """The largest peak RSS among this process's finished children (DataLoader workers, helper tools).

    A forked child counts the pages it shares with its parent, so this overstates the child's own use.
    """
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(peak / (MIB if sys.platform == "darwin" else 1024), 1) if peak else None


# ----------------------------------------------------------------------------- steps
@torch.inference_mode()
def sample_throughput(job: ExtractJob, plan: CachePlan, device: torch.device, n_images: int) -> tuple[float, int]:
    """Images/s of the frozen backbone (decoding included, as in extraction) on a seeded sample."""
    from pipeline.data import ImageListDataset, Split, eval_transform
    from pipeline.frozen import build_frozen, frozen_features

    data = plan.data
    split = Split(data.train.paths + data.val.paths, data.train.labels + data.val.labels)
    order = np.random.default_rng(job.seed).permutation(len(split))[:n_images]
    dataset = Subset(ImageListDataset(data.root, split, eval_transform(plan.spec.preprocess)), order.tolist())
    loader = DataLoader(dataset, batch_size=job.extract.batch_size, num_workers=job.data.num_workers)
    extractor = build_frozen(job.backbone, plan.spec, job.seed, device)
    t0 = time.perf_counter()
    for _ in frozen_features(extractor, (images for images, _ in loader), device, job.extract.autocast):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(order) / (time.perf_counter() - t0), len(order)


def extract_step(cfg: Config, device: torch.device) -> dict:
    """The benchmark's extract step (run like a stage's run_<stage>): see `measure_extraction`."""
    from pipeline.extract import ExtractJob

    return measure_extraction(ExtractJob.of(cfg), cfg.benchmark.timing_images, device)


def measure_extraction(job: ExtractJob, timing_images: int, device: torch.device) -> dict:
    """Build or reuse the cache; on reuse, estimate what extraction costs from a timed sample.

    timing_images: benchmark.timing_images.
    """
    from pipeline.extract import ensure_cache

    plan, entry = ensure_cache(job, device)
    n_train, n_val = len(plan.data.train), len(plan.data.val)
    out = {"cache_hit": entry["cache_hit"], "cache_file": entry["cache_file"], "images": entry["images"],
           "n_train": n_train, "n_val": n_val, "classes": list(plan.data.classes),
           "feature_dim": None, "image_size": plan.spec.preprocess.crop_size}
    if entry["cache_hit"]:
        ips, sampled = sample_throughput(job, plan, device, timing_images)
        out.update(extract_seconds=entry["seconds"] + entry["images"] / ips, images_per_second=ips,
                   source=f"estimated: the cache was reused, so extraction = hashing ({entry['seconds']:.1f} s) "
                          f"+ {entry['images']} images at the backbone's images/s timed now on {sampled} images")
    else:
        out.update(extract_seconds=entry["seconds"], images_per_second=entry["images_per_second"],
                   source="measured: the cache was built in this benchmark")
        update_metrics(job.run_dir, "extract", entry)
    out["feature_dim"] = (cache.read_attrs(plan.path) or {}).get("feature_dim")
    return out


def _run_stage(name: str):
    from pipeline.finetune import run_finetune
    from pipeline.head import run_head
    from pipeline.logistic import run_logistic

    return {"extract": extract_step, "head": run_head, "logistic": run_logistic, "finetune": run_finetune}[name]


def run_step(step: str, cfg: Config, device_name: str) -> dict:
    """Run one step here and report its wall seconds and peak memory (the entry point of a child)."""
    apply_stage_threads(step, cfg.head.type, cfg.run.num_threads)  # as the same stage run on its own
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(cfg.run.seed)
    rss_before = peak_rss_mib()
    t0 = time.perf_counter()
    entry = _run_stage(step)(cfg, device)
    entry = {k: v for k, v in entry.items() if k != "history"}  # kept in the run folder's metrics.json
    entry["step_seconds"] = time.perf_counter() - t0
    entry["pid"] = os.getpid()
    entry["peak_rss_mib"] = peak_rss_mib()
    entry["peak_rss_before_mib"] = rss_before
    entry["peak_rss_children_mib"] = children_peak_rss_mib()
    entry["peak_gpu_mib"] = (round(torch.cuda.max_memory_allocated(device) / MIB, 1)
                             if device.type == "cuda" else None)
    return entry


def measure(step: str, cfg: Config, device: torch.device) -> dict:
    """run_step in a fresh process (benchmark.isolate) or in this one."""
    args = (step, cfg, str(device))
    if not cfg.benchmark.isolate:
        return run_step(*args)
    # spawn, not fork: a forked child would start with this process's memory already resident.
    # The worker exits when this process dies, even by kill -9 (it would otherwise wait on its pipe forever).
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with_parent,
                             initargs=(os.getpid(),)) as pool:
        return pool.submit(run_step, *args).result()


# ----------------------------------------------------------------------------- one backbone
def split_entry(entry: str) -> tuple[str, Optional[str]]:
    """'resnet18@none' -> ('resnet18', 'none'): a benchmark.backbones entry may carry its own weights."""
    name, sep, weights = entry.partition("@")
    return name, (weights if sep else None)


def backbone_config(cfg: Config, backbone: str) -> Config:
    """cfg for one backbone of the benchmark: its own run folder, the benchmark's finetune epochs."""
    bench = cfg.benchmark
    finetune = dataclasses.replace(cfg.finetune, epochs=bench.finetune_epochs or cfg.finetune.epochs)
    name, weights = split_entry(backbone)
    network = dataclasses.replace(cfg.backbone, name=name, weights=weights or cfg.backbone.weights)
    run = dataclasses.replace(cfg.run, name=f"{cfg.run.name}/{backbone.replace('/', '-')}")
    return dataclasses.replace(cfg, backbone=network, run=run, finetune=finetune)


def benchmark_backbone(cfg: Config, backbone: str, device: torch.device) -> dict:
    """Measure every configured method for one backbone; the rows and break-even of the table."""
    per_backbone = backbone_config(cfg, backbone)
    methods = cfg.benchmark.methods
    steps: dict[str, dict] = {}
    if "head" in methods or "logistic" in methods:
        steps["extract"] = measure("extract", per_backbone, device)
    for method in methods:
        steps[method] = measure(method, per_backbone, device)
    rows, break_even = method_rows(steps, per_backbone.head, cfg.finetune.epochs, f"benchmark of {backbone}")
    for row in rows:
        row["backbone"] = backbone
    return {"backbone": backbone, "run_dir": str(per_backbone.run_dir), "rows": rows, "break_even": break_even,
            "steps": steps}


def method_rows(steps: dict[str, dict], head: HeadConfig, finetune_epochs: int,
                source: str) -> tuple[list[dict], Optional[dict]]:
    """The table's rows for one backbone's steps, and its break-even; the training stages' entries are read
    as records.StageResult (a key missing from an entry fails naming the step and its record version).

    head: the head section the head step ran with; finetune_epochs: finetune.epochs as configured.
    """
    rows, break_even = [], None
    extraction = steps.get("extract")
    if extraction:
        rows.append({"method": f"extract (cache {'hit' if extraction['cache_hit'] else 'miss'})",
                     "extract_seconds": extraction["extract_seconds"], "total_seconds": extraction["extract_seconds"],
                     "images_per_second": extraction["images_per_second"],
                     "peak_rss_mib": extraction["peak_rss_mib"], "peak_gpu_mib": extraction["peak_gpu_mib"]})
    results = {m: StageResult.from_dict(m, steps[m], source) for m in ("head", "logistic", "finetune") if m in steps}
    if "head" in results:
        break_even = _break_even(extraction, results["head"], head.epochs)
        rows.append(_head_row(extraction, results["head"], head, break_even) | _selection(results["head"]))
    if "logistic" in results:
        rows.append(_logistic_row(extraction, results["logistic"]) | _selection(results["logistic"]))
    if "finetune" in results:
        rows.append(_finetune_row(results["finetune"], finetune_epochs) | _selection(results["finetune"]))
    return rows, break_even


def _selection(result: StageResult) -> dict:
    """The row's test figures (scored once, after selection; None without a test split) and what chose the model."""
    return {"test_acc": result.test_acc, "test_mean_per_class": result.test_mean_per_class,
            "selected_on": selected_on(result.details)}


MEASURED = ("mean_per_class_acc", "peak_rss_mib", "peak_gpu_mib")  # added to every training step's entry


def _break_even(extraction: dict, head: StageResult, head_epochs: int) -> dict:
    train_seconds = head.require("train_seconds")["train_seconds"]
    pass_seconds = (extraction["n_train"] + extraction["n_val"]) / extraction["images_per_second"]
    loop = loop_seconds_per_run(head_epochs, pass_seconds, train_seconds)
    return {"extract_seconds": extraction["extract_seconds"], "head_seconds_per_run": train_seconds,
            "head_epochs": head_epochs, "backbone_pass_seconds": pass_seconds, "loop_seconds_per_run": loop,
            "extraction_in_loop_epochs": extraction["extract_seconds"] / pass_seconds,
            "break_even_runs": break_even_runs(extraction["extract_seconds"], train_seconds, loop),
            "throughput_source": ("the extraction's images/s" if not extraction["cache_hit"]
                                  else "backbone images/s timed on a sample (cache reused)")}


def _head_row(extraction: dict, head: StageResult, head_cfg: HeadConfig, break_even: dict) -> dict:
    facts = head.require("train_seconds", *MEASURED)
    return {"method": f"head ({head_cfg.type}, {plural(head_cfg.epochs, 'epoch')})", "val_acc": head.val_acc,
            "mean_per_class_acc": facts["mean_per_class_acc"], "extract_seconds": extraction["extract_seconds"],
            "fit_seconds": facts["train_seconds"], "total_seconds": extraction["extract_seconds"] + head.seconds,
            "peak_rss_mib": facts["peak_rss_mib"], "peak_gpu_mib": facts["peak_gpu_mib"],
            "break_even_runs": break_even["break_even_runs"]}


def _logistic_row(extraction: dict, logistic: StageResult) -> dict:
    facts = logistic.require("C", "fit_seconds", *MEASURED)
    return {"method": f"logistic (C={facts['C']:g})", "val_acc": logistic.val_acc,
            "mean_per_class_acc": facts["mean_per_class_acc"], "extract_seconds": extraction["extract_seconds"],
            "fit_seconds": facts["fit_seconds"], "total_seconds": extraction["extract_seconds"] + logistic.seconds,
            "peak_rss_mib": facts["peak_rss_mib"], "peak_gpu_mib": facts["peak_gpu_mib"]}


def _finetune_row(finetune: StageResult, configured_epochs: int) -> dict:
    facts = finetune.require("epochs", "seconds_per_epoch", "train_seconds", "train_images_per_second", *MEASURED)
    epochs = facts["epochs"]
    note = "" if epochs == configured_epochs else f" of finetune.epochs={configured_epochs}"
    return {"method": f"finetune ({plural(epochs, 'epoch')}{note})", "val_acc": finetune.val_acc,
            "mean_per_class_acc": facts["mean_per_class_acc"],
            "finetune_seconds_per_epoch": facts["seconds_per_epoch"], "finetune_seconds": facts["train_seconds"],
            "total_seconds": finetune.seconds, "images_per_second": facts["train_images_per_second"],
            "peak_rss_mib": facts["peak_rss_mib"], "peak_gpu_mib": facts["peak_gpu_mib"]}


def _baseline(results: list[dict], isolate: bool) -> Optional[float]:
    """The smallest RSS a step's process had before the step (benchmark.isolate): the runtime every figure includes."""
    before = [s["peak_rss_before_mib"] for r in results for s in r["steps"].values() if s.get("peak_rss_before_mib")]
    return min(before) if before and isolate else None


def check_backbones(cfg: Config, backbones: list[str]) -> None:
    """Every backbone's name, settings and weights, checked before minutes are spent on any of them.

    Weights are downloaded now if they are missing (finetuning needs them; a head needs them unless
    its cache file exists); an error names the benchmark.backbones entry and how to drop it.
    """
    from pipeline.backbones import check_name, ensure_weights, resolve_backbone
    from pipeline.extract import has_cache_file
    from pipeline.head import check_head_type

    key_of = (lambda i: f"benchmark.backbones[{i}]") if cfg.benchmark.backbones else (lambda i: "backbone.name")
    for i, name in enumerate(backbones):
        per_backbone = backbone_config(cfg, name)
        try:
            check_name(split_entry(name)[0], key_of(i))
            spec = resolve_backbone(per_backbone.backbone, cfg.run.seed)
            if "head" in cfg.benchmark.methods:
                check_head_type(per_backbone.head.type, per_backbone.backbone)
            if "finetune" in cfg.benchmark.methods or not has_cache_file(per_backbone.extract, spec, per_backbone.data.root):
                ensure_weights(per_backbone.backbone)
        except PipelineError as e:
            if not cfg.benchmark.backbones:
                raise
            others = json.dumps([b for b in backbones if b != name] or ["efficientnet_lite0"])
            lines = [ln for ln in str(e).splitlines() if "--set backbone.name=" not in ln]
            prefix = "" if lines[0].startswith(key_of(i)) else f"{key_of(i)} '{name}': "
            raise type(e)(prefix + "\n".join(lines) + f"\n  or drop it: --set 'benchmark.backbones={others}'") from None


def run_benchmark(cfg: Config, device: torch.device) -> dict:
    from pipeline.data import load_dataset

    backbones = cfg.benchmark.backbones or [cfg.backbone.name]
    check_backbones(cfg, backbones)
    data = load_dataset(cfg.data)
    t0 = time.perf_counter()
    results, errors = [], []
    for name in backbones:
        print(f"benchmark: {name} ({', '.join(cfg.benchmark.methods)})")
        try:
            results.append(benchmark_backbone(cfg, name, device))
        except PipelineError as e:
            print(f"benchmark: {name} failed: {e}", file=sys.stderr)
            errors.append({"backbone": name, "error": str(e)})
    first_extract = next((r["steps"]["extract"] for r in results if "extract" in r["steps"]), None)
    result = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S %z"), "seed": cfg.run.seed,
        "environment": environment_info(device), "wall_seconds": round(time.perf_counter() - t0, 1),
        "data": {"root": cfg.data.root, "n_train": len(data.train), "n_val": len(data.val),
                 "classes": list(data.classes),
                 "image_size": first_extract["image_size"] if first_extract else cfg.backbone.image_size},
        "finetune_epochs": cfg.benchmark.finetune_epochs or cfg.finetune.epochs,
        "configured_finetune_epochs": cfg.finetune.epochs, "isolate": cfg.benchmark.isolate,
        "memory_note": memory_note(cfg.benchmark.isolate),
        "baseline_rss_mib": _baseline(results, cfg.benchmark.isolate),
        "config": cfg.to_dict(),
        "rows": [row for r in results for row in r["rows"]], "backbones": results, "errors": errors}
    write_outputs(cfg.run_dir, result)
    print(f"\nbenchmark ({cfg.run_dir / BENCHMARK_MD}, {result['wall_seconds']:.1f} s):\n")
    print(markdown_report(result))
    if errors:
        raise PipelineError("benchmark: " + "; ".join(f"{e['backbone']} failed: {e['error']}" for e in errors))
    return result
