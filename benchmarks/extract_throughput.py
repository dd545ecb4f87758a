"""Extraction speed against the bare-forward ceiling, and peak memory against the image count.

    python benchmarks/extract_throughput.py [--data demo:digits] [--rss-images 180] [--autocast bfloat16]

1. bare forward: the unmodified frozen backbone's forward alone on already-decoded, already-resized
   tensors held in memory, at the extraction batch size (channels_last, inference mode): the
   reference (ratio 1.000);
2. folded forward: the same with batch norm folded into the convolutions (what extraction runs);
3. pipeline: the extract stage end to end on an empty cache (hashing, decoding, resizing, forward,
   HDF5 writes), same batch size, same process;
   printed as images/s each and their ratio to 1 (best of --repeat runs each, interleaved);
   with --autocast float16|bfloat16 also 2. and 3. under extract.autocast, interleaved with the others,
   their ratio to the float32 pipeline, and the cached features' relative difference from float32's
   (||a - b|| / ||b|| over all rows);
4. peak RSS of the extract stage in fresh processes on N and 10*N images (--rss-images 0: skipped).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
import torch

from _common import REPO, table
from pipeline.backbones import build_feature_extractor, resolve_backbone
from pipeline.config import load_config
from pipeline.data import ImageListDataset, eval_transform, load_image_folder
from pipeline.extract import ExtractJob, ensure_cache
from pipeline.frozen import AUTOCAST_DTYPES


@torch.inference_mode()
def bare_forward_seconds(cfg, images: torch.Tensor, fold: bool, autocast: str = "none") -> float:
    spec = resolve_backbone(cfg.backbone, cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    extractor = build_feature_extractor(cfg.backbone, spec, fold=fold).to(memory_format=torch.channels_last)
    bs = cfg.extract.batch_size
    with torch.autocast("cpu", dtype=AUTOCAST_DTYPES.get(autocast), enabled=autocast != "none"):
        extractor(images[:bs])  # warm-up: oneDNN picks its kernels on the first call
        t0 = time.perf_counter()
        for start in range(0, len(images), bs):
            extractor(images[start:start + bs])
        return time.perf_counter() - t0


def pipeline_seconds(cfg_args, work: Path, run: int, autocast: str = "none") -> tuple[float, str]:
    """Seconds of the extract stage on an empty cache, and the cache file it wrote."""
    cfg = load_config(cfg_args[0], cfg_args[1] + [f"extract.cache_dir={work / f'cache{run}-{autocast}'}",
                                                  f"extract.autocast={autocast}"])
    t0 = time.perf_counter()
    plan, entry = ensure_cache(ExtractJob.of(cfg), torch.device("cpu"))
    seconds = time.perf_counter() - t0
    assert not entry["cache_hit"]
    return seconds, str(plan.path)


def feature_difference(path: str, reference: str) -> float:
    """||a - b|| / ||b|| of two caches' features (train and val rows, the same images in the same order)."""
    from pipeline.cache import open_cache

    a, b = open_cache(path).load(), open_cache(reference).load()
    fa = torch.cat([torch.as_tensor(a.train.features), torch.as_tensor(a.val.features)]).double()
    fb = torch.cat([torch.as_tensor(b.train.features), torch.as_tensor(b.val.features)]).double()
    return float((fa - fb).norm() / fb.norm())


def timed_sides(args, cfg, sets, decoded: torch.Tensor, n: int, work: Path) -> tuple[list[tuple], dict]:
    """The table's rows (each side's best images/s over --repeat interleaved runs, and its ratio), and
    every run's images/s by side."""
    sides: dict[str, list[float]] = {}
    files: dict[str, str] = {}
    for run in range(args.repeat):  # interleaved so that every side sees the same machine
        sides.setdefault("ceiling", []).append(n / bare_forward_seconds(cfg, decoded, fold=False))
        sides.setdefault("folded", []).append(n / bare_forward_seconds(cfg, decoded, fold=True))
        seconds, files["none"] = pipeline_seconds((args.params, sets), work, run)
        sides.setdefault("pipeline", []).append(n / seconds)
        if args.autocast != "none":
            sides.setdefault("folded_ac", []).append(n / bare_forward_seconds(cfg, decoded, True, args.autocast))
            seconds, files["ac"] = pipeline_seconds((args.params, sets), work, run, args.autocast)
            sides.setdefault("pipeline_ac", []).append(n / seconds)
    best = {k: max(v) for k, v in sides.items()}
    rows = [("bare forward, unmodified network", f"{best['ceiling']:.1f}", "1.000"),
            ("bare forward, batch norm folded", f"{best['folded']:.1f}", f"{best['folded'] / best['ceiling']:.3f}"),
            ("pipeline extract (folded)", f"{best['pipeline']:.1f}", f"{best['pipeline'] / best['ceiling']:.3f}")]
    if args.autocast != "none":
        diff = feature_difference(files["ac"], files["none"])
        rows += [(f"bare forward, folded, autocast {args.autocast}", f"{best['folded_ac']:.1f}",
                  f"{best['folded_ac'] / best['ceiling']:.3f} ({best['folded_ac'] / best['folded']:.2f}x folded)"),
                 (f"pipeline extract, autocast {args.autocast}", f"{best['pipeline_ac']:.1f}",
                  f"{best['pipeline_ac'] / best['ceiling']:.3f} ({best['pipeline_ac'] / best['pipeline']:.2f}x "
                  f"float32's; features {diff:.4f} from float32's)")]
    return rows, sides


def subset_folder(data, n: int, target: Path) -> Path:
    """Copy the first n images (round-robin over train then val) into a new ImageFolder."""
    per_split = {"train": max(1, int(n * 0.75)), "val": max(1, n - int(n * 0.75))}
    for split, count in per_split.items():
        s = data.split(split)
        # Round-robin over classes so every class keeps images in both splits.
        by_class = {}
        for p, l in zip(s.paths, s.labels):
            by_class.setdefault(l, []).append(p)
        chosen = [ps[i] for i in range(max(len(v) for v in by_class.values()))
                  for ps in by_class.values() if i < len(ps)][:count]
        for p in chosen:
            dst = target / p
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(data.root / p, dst)
    return target


def child_peak_rss(params: str, sets: list[str], root: Path, cache: Path) -> float:
    code = ("import sys, resource, torch; sys.path.insert(0, %r); from pipeline.config import load_config; "
            "from pipeline.extract import ExtractJob, ensure_cache; "
            "cfg = load_config(%r, %r); ensure_cache(ExtractJob.of(cfg), torch.device('cpu')); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)") % (
        str(REPO), params, sets + [f"data.root={root}", f"extract.cache_dir={cache}"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.json"), help="params file (default params.json)")
    parser.add_argument("--data", default=None, help="data.root override (default: the params file's)")
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs of each side (default 2)")
    parser.add_argument("--rss-images", type=int, default=170, help="N for the peak-RSS check (default 170; 0: none)")
    parser.add_argument("--autocast", default="none", choices=("none", "float16", "bfloat16"),
                        help="also time extraction under extract.autocast=this (default: none)")
    parser.add_argument("--output", default=None, help="write the figures as JSON here (default: no file)")
    args = parser.parse_args()

    sets = [f"data.root={args.data}"] if args.data else []
    cfg = load_config(args.params, sets)
    data = load_image_folder(cfg.data.root)
    spec = resolve_backbone(cfg.backbone, cfg.run.seed)
    n = len(data.train) + len(data.val)
    print(f"{n} images from {data.root}, {cfg.backbone.name} at {spec.preprocess.crop_size} px, batch "
          f"{cfg.extract.batch_size}, {cfg.data.num_workers} loader worker(s), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    tf = eval_transform(spec.preprocess)
    decoded = torch.stack([x for split in ("train", "val")
                           for x, _ in ImageListDataset(data.root, data.split(split), tf)])
    decoded = decoded.contiguous(memory_format=torch.channels_last)

    work = Path(tempfile.mkdtemp(prefix="extract_tp-"))
    rows, sides = timed_sides(args, cfg, sets, decoded, n, work)
    print(table(rows, ("side", "images/s", "ratio")))
    figures = {f"{side}_images_per_second": rates for side, rates in sides.items()}
    if args.rss_images:
        small = subset_folder(data, args.rss_images, work / "small")
        large = subset_folder(data, 10 * args.rss_images, work / "large")
        n_small = sum(1 for _ in small.rglob("*.*"))
        n_large = sum(1 for _ in large.rglob("*.*"))
        rss_small = child_peak_rss(args.params, sets, small, work / "rss_small")
        rss_large = child_peak_rss(args.params, sets, large, work / "rss_large")
        print(table([(n_small, f"{rss_small:.0f}"), (n_large, f"{rss_large:.0f}")], ("images", "peak RSS MiB")))
        print(f"peak RSS ratio ({n_large} vs {n_small} images): {rss_large / rss_small:.3f}")
        figures["rss_mb"] = {n_small: rss_small, n_large: rss_large}
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
