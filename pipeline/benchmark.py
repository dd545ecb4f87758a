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
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from pipeline import PipelineError
from pipeline import cache as fc
from pipeline.config import Config
from pipeline.fsutil import exit_with_parent
from pipeline.metrics import update_metrics, write_json
from pipeline.runtime import apply_stage_threads, environment_info, seed_everything

BENCHMARK_JSON, BENCHMARK_MD, BENCHMARK_PNG = "benchmark.json", "benchmark.md", "benchmark.png"
MIB = 2 ** 20


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


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
def sample_throughput(cfg: Config, plan, device: torch.device, n_images: int) -> tuple[float, int]:
    """Images/s of the frozen backbone (decoding included, as in extraction) on a seeded sample."""
    from pipeline.frozen import build_frozen, frozen_features
    from pipeline.data import ImageListDataset, Split, eval_transform

    data = plan.data
    split = Split(data.train.paths + data.val.paths, data.train.labels + data.val.labels)
    order = np.random.default_rng(cfg.run.seed).permutation(len(split))[:n_images]
    dataset = Subset(ImageListDataset(data.root, split, eval_transform(plan.spec.preprocess)), order.tolist())
    loader = DataLoader(dataset, batch_size=cfg.extract.batch_size, num_workers=cfg.data.num_workers)
    extractor = build_frozen(cfg.backbone, plan.spec, cfg.run.seed, device)
    t0 = time.perf_counter()
    for _ in frozen_features(extractor, (images for images, _ in loader), device, cfg.extract.autocast):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(order) / (time.perf_counter() - t0), len(order)


def extract_step(cfg: Config, device: torch.device) -> dict:
    """Build or reuse the cache; on reuse, estimate what extraction costs from a timed sample."""
    from pipeline.extract import ensure_cache

    plan, entry = ensure_cache(cfg, device)
    n_train, n_val = len(plan.data.train), len(plan.data.val)
    out = {"cache_hit": entry["cache_hit"], "cache_file": entry["cache_file"], "images": entry["images"],
           "n_train": n_train, "n_val": n_val, "classes": list(plan.data.classes),
           "feature_dim": None, "image_size": plan.spec.preprocess.crop_size}
    if entry["cache_hit"]:
        ips, sampled = sample_throughput(cfg, plan, device, cfg.benchmark.timing_images)
        out.update(extract_seconds=entry["seconds"] + entry["images"] / ips, images_per_second=ips,
                   source=f"estimated: the cache was reused, so extraction = hashing ({entry['seconds']:.1f} s) "
                          f"+ {entry['images']} images at the backbone's images/s timed now on {sampled} images")
    else:
        out.update(extract_seconds=entry["seconds"], images_per_second=entry["images_per_second"],
                   source="measured: the cache was built in this benchmark")
        update_metrics(cfg.run_dir, "extract", entry)
    out["feature_dim"] = (fc.read_attrs(plan.path) or {}).get("feature_dim")
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
    ft = dataclasses.replace(cfg.finetune, epochs=bench.finetune_epochs or cfg.finetune.epochs)
    name, weights = split_entry(backbone)
    bb = dataclasses.replace(cfg.backbone, name=name, weights=weights or cfg.backbone.weights)
    return dataclasses.replace(cfg, backbone=bb,
                               run=dataclasses.replace(cfg.run, name=f"{cfg.run.name}/{backbone.replace('/', '-')}"), finetune=ft)


def benchmark_backbone(cfg: Config, backbone: str, device: torch.device) -> dict:
    """Measure every configured method for one backbone; the rows and break-even of the table."""
    bcfg = backbone_config(cfg, backbone)
    methods = cfg.benchmark.methods
    steps: dict[str, dict] = {}
    if "head" in methods or "logistic" in methods:
        steps["extract"] = measure("extract", bcfg, device)
    for method in methods:
        steps[method] = measure(method, bcfg, device)
    rows = []
    ex = steps.get("extract")
    if ex:
        rows.append({"method": f"extract (cache {'hit' if ex['cache_hit'] else 'miss'})",
                     "extract_seconds": ex["extract_seconds"], "total_seconds": ex["extract_seconds"],
                     "images_per_second": ex["images_per_second"], "peak_rss_mib": ex["peak_rss_mib"],
                     "peak_gpu_mib": ex["peak_gpu_mib"]})
    break_even = None
    if "head" in steps:
        h = steps["head"]
        pass_seconds = (ex["n_train"] + ex["n_val"]) / ex["images_per_second"]
        loop = loop_seconds_per_run(bcfg.head.epochs, pass_seconds, h["train_seconds"])
        break_even = {"extract_seconds": ex["extract_seconds"], "head_seconds_per_run": h["train_seconds"],
                      "head_epochs": bcfg.head.epochs, "backbone_pass_seconds": pass_seconds,
                      "loop_seconds_per_run": loop, "extraction_in_loop_epochs": ex["extract_seconds"] / pass_seconds,
                      "break_even_runs": break_even_runs(ex["extract_seconds"], h["train_seconds"], loop),
                      "throughput_source": ("the extraction's images/s" if not ex["cache_hit"]
                                            else "backbone images/s timed on a sample (cache reused)")}
        rows.append({"method": f"head ({bcfg.head.type}, {plural(bcfg.head.epochs, 'epoch')})", "val_acc": h["val_acc"],
                     "mean_per_class_acc": h["mean_per_class_acc"], "extract_seconds": ex["extract_seconds"],
                     "fit_seconds": h["train_seconds"], "total_seconds": ex["extract_seconds"] + h["seconds"],
                     "peak_rss_mib": h["peak_rss_mib"], "peak_gpu_mib": h["peak_gpu_mib"],
                     "break_even_runs": break_even["break_even_runs"]})
    if "logistic" in steps:
        lg = steps["logistic"]
        rows.append({"method": f"logistic (C={lg['C']:g})", "val_acc": lg["val_acc"],
                     "mean_per_class_acc": lg["mean_per_class_acc"], "extract_seconds": ex["extract_seconds"],
                     "fit_seconds": lg["fit_seconds"], "total_seconds": ex["extract_seconds"] + lg["seconds"],
                     "peak_rss_mib": lg["peak_rss_mib"], "peak_gpu_mib": lg["peak_gpu_mib"]})
    if "finetune" in steps:
        ft = steps["finetune"]
        epochs = ft["epochs"]
        note = "" if epochs == cfg.finetune.epochs else f" of finetune.epochs={cfg.finetune.epochs}"
        rows.append({"method": f"finetune ({plural(epochs, 'epoch')}{note})", "val_acc": ft["val_acc"],
                     "mean_per_class_acc": ft["mean_per_class_acc"],
                     "finetune_seconds_per_epoch": ft["seconds_per_epoch"], "finetune_seconds": ft["train_seconds"],
                     "total_seconds": ft["seconds"], "images_per_second": ft["train_images_per_second"],
                     "peak_rss_mib": ft["peak_rss_mib"], "peak_gpu_mib": ft["peak_gpu_mib"]})
    for row in rows:
        row["backbone"] = backbone
    return {"backbone": backbone, "run_dir": str(bcfg.run_dir), "rows": rows, "break_even": break_even,
            "steps": steps}


# ----------------------------------------------------------------------------- output
COLUMNS = (("backbone", "backbone"), ("method", "method"), ("val_acc", "val top-1"),
           ("mean_per_class_acc", "mean per-class"), ("extract_seconds", "extract s"), ("fit_seconds", "fit s"),
           ("finetune_seconds_per_epoch", "finetune s/epoch"), ("finetune_seconds", "finetune s"),
           ("total_seconds", "total s"), ("images_per_second", "images/s"), ("peak_rss_mib", "peak RSS MiB"),
           ("peak_gpu_mib", "peak GPU MiB"), ("break_even_runs", "break-even runs"))


def _cell(key: str, v) -> str:
    if v is None:
        return "–"
    if key in ("val_acc", "mean_per_class_acc"):
        return f"{v:.4f}"
    if isinstance(v, float):
        return f"{v:.1f}" if v >= 10 else f"{v:.2f}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "|".join("---" if k in ("backbone", "method") else "--:" for k, _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cell(k, r.get(k)) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def break_even_text(backbone: str, be: dict) -> str:
    runs = be["break_even_runs"]
    verdict = (f"pays for itself after {plural(runs, 'head run')}" if runs is not None
               else "never pays for itself (a cached run is not faster)")
    return (f"{backbone}: the one-time extraction ({be['extract_seconds']:.1f} s, "
            f"{be['extraction_in_loop_epochs']:.2f} epochs of the loop) {verdict}: a {be['head_epochs']}-epoch head "
            f"run takes {be['head_seconds_per_run']:.2f} s from the cache vs {be['loop_seconds_per_run']:.1f} s in a "
            f"feature-extractor loop that recomputes the backbone over train+val every epoch "
            f"({be['backbone_pass_seconds']:.1f} s per pass, from {be['throughput_source']}).")


def markdown_report(result: dict) -> str:
    env, data = result["environment"], result["data"]
    lines = ["# Benchmark: cached-feature heads vs finetuning", "",
             f"Data `{data['root']}`: {data['n_train']} train / {data['n_val']} val images, "
             f"{len(data['classes'])} classes, {data['image_size']} px; seed {result['seed']}.  ",
             f"torch {env['torch']}, torchvision {env['torchvision']}, device {env['device']}"
             + (f" ({env['gpu']})" if env.get("gpu") else "")
             + f", {env['num_threads']} threads; {result['created']}.  ",
             f"Finetuning: {plural(result['finetune_epochs'], 'epoch')}"
             + (f" (fewer than finetune.epochs={result['configured_finetune_epochs']}, to keep the benchmark short)"
                if result["finetune_epochs"] != result["configured_finetune_epochs"] else "") + ".", "",
             markdown_table(result["rows"]), ""]
    lines += [f"- {break_even_text(b['backbone'], b['break_even'])}" for b in result["backbones"] if b["break_even"]]
    lines += [f"- {b['backbone']}: extraction cost {b['steps']['extract']['source']}."
              for b in result["backbones"] if "extract" in b["steps"]]
    lines += [f"- **{e['backbone']} failed**: {e['error']}" for e in result["errors"]]
    lines += ["", "Columns: *fit s* is the head's SGD loop or the logistic grid search (cross-validation and "
              "refit); *total s* adds, for cached methods, the one-time extraction and the loading of the cache; "
              "*finetune s* is the training loop with a val pass per epoch; *images/s* is the extraction's "
              "(decoding included) or finetuning's training throughput.",
              f"Peak RSS: {result['memory_note']} Peak GPU: torch.cuda.max_memory_allocated, on CUDA only.",
              *([f"Each step's process held {result['baseline_rss_mib']:.0f} MiB before the step began "
                 "(interpreter, torch and this package)."] if result.get("baseline_rss_mib") else []),
              "Seconds exclude starting a process and importing torch."]
    return "\n".join(lines) + "\n"


def _memory_note(isolate: bool) -> str:
    if isolate:
        return ("ru_maxrss of the process that ran the step alone (spawned fresh, so it includes the Python, "
                "torch and library runtime loaded by that step). DataLoader workers are separate processes and "
                "not included; benchmark.json's peak_rss_children_mib is the largest child's ru_maxrss, which "
                "counts the pages a forked worker shares with the step's process, so it overstates their own use.")
    return ("ru_maxrss of the one process that ran every step in turn (benchmark.isolate=false): "
            "a running high-water mark, so a later step's figure can be an earlier step's peak.")


def _baseline(results: list[dict], cfg: Config) -> Optional[float]:
    """The smallest RSS a step's process had before the step: the runtime every figure includes."""
    before = [s["peak_rss_before_mib"] for r in results for s in r["steps"].values() if s.get("peak_rss_before_mib")]
    return min(before) if before and cfg.benchmark.isolate else None


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
        bcfg = backbone_config(cfg, name)
        try:
            check_name(split_entry(name)[0], key_of(i))
            spec = resolve_backbone(bcfg.backbone, cfg.run.seed)
            if "head" in cfg.benchmark.methods:
                check_head_type(bcfg.head.type, bcfg.backbone)
            if "finetune" in cfg.benchmark.methods or not has_cache_file(bcfg, spec):
                ensure_weights(bcfg.backbone)
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
        "memory_note": _memory_note(cfg.benchmark.isolate), "baseline_rss_mib": _baseline(results, cfg),
        "config": cfg.to_dict(),
        "rows": [row for r in results for row in r["rows"]], "backbones": results, "errors": errors}
    write_outputs(cfg.run_dir, result)
    print(f"\nbenchmark ({cfg.run_dir / BENCHMARK_MD}, {result['wall_seconds']:.1f} s):\n")
    print(markdown_report(result))
    if errors:
        raise PipelineError("benchmark: " + "; ".join(f"{e['backbone']} failed: {e['error']}" for e in errors))
    return result


def write_outputs(run_dir: Path, result: dict) -> list[Path]:
    from pipeline.plots import plot_benchmark

    run_dir = Path(run_dir)
    write_json(run_dir / BENCHMARK_JSON, result)
    (run_dir / BENCHMARK_MD).write_text(markdown_report(result), encoding="utf-8")
    written = [run_dir / BENCHMARK_JSON, run_dir / BENCHMARK_MD]
    chart_rows = [r for r in result["rows"] if not r["method"].startswith("extract")]
    if chart_rows:
        env = result["environment"]
        written.append(plot_benchmark(chart_rows, run_dir / BENCHMARK_PNG,
                                      f"{result['data']['root']}: cached-feature heads vs finetuning",
                                      f"torch {env['torch']} on {env['device']}, {env['num_threads']} threads; "
                                      f"bars of cached methods include the one-time extraction"))
    return written
