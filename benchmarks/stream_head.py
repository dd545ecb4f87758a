"""Heads from a cache bigger than the memory budget: peak RSS and samples/s, streamed vs in memory.

    python benchmarks/stream_head.py [--cache-gb 2.0] [--budget-gb 0.5] [--epochs 2] [--skip-in-memory]

Builds a synthetic feature cache in this project's format (CacheWriter: chunked, fletcher32,
verified manifest) of about --cache-gb of float32 features: --dim values per row, --classes
classes with class-dependent means plus unit Gaussian noise, rows sorted by class as ImageFolder
writes them, 95 % train and 5 % val. Then each case runs in its own fresh process, so that its
peak RSS is its own:

- head, streamed:        StreamBatches under --budget-gb, the head stage's epoch loop (fit_head);
- logistic, streamed:    the out-of-core SGDClassifier of the logistic stage under --budget-gb;
- head, in memory:       the whole cache loaded (read_cache), as the head stage does below its budget.

The table gives peak RSS (ru_maxrss), the RSS after the imports (torch alone costs ~500 MB), their
difference, which must stay under the budget, samples/s (train rows x passes / training seconds)
and val accuracy. The cache is deleted afterwards unless --keep.
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
import numpy as np

from _common import peak_rss_mb, table

GIB = 2 ** 30
VAL_FRACTION = 0.05
BLOCK_ROWS = 16384  # rows generated and written at a time


# ----------------------------------------------------------------------------- the synthetic cache
def build_cache(path: Path, n_rows: int, dim: int, classes: int, separation: float, seed: int) -> dict:
    """Write a complete cache of class-sorted Gaussian blobs; return its sizes."""
    from pipeline import cache as fc

    rng = np.random.default_rng(seed)
    means = (rng.normal(size=(classes, dim)) * separation).astype(np.float32)
    sizes = {"val": max(classes, int(n_rows * VAL_FRACTION))}
    sizes["train"] = n_rows - sizes["val"]
    names = [f"class_{c:02d}" for c in range(classes)]
    with fc.CacheWriter(path, dim, "float32") as writer:
        offset = 0
        for split in fc.SPLITS:
            n = sizes[split]
            labels = np.arange(n) * classes // n  # ImageFolder order: sorted by class
            writer.create_split(split, fc.SplitManifest(
                tuple(f"{split}/{names[c]}/{i:07d}.png" for i, c in enumerate(labels)), tuple(labels.tolist()),
                tuple(f"{offset + i:064x}" for i in range(n))))
            for start in range(0, n, BLOCK_ROWS):
                y = labels[start:start + BLOCK_ROWS]
                x = rng.standard_normal((len(y), dim), dtype=np.float32)
                x += means[y]
                writer.write_rows(split, start, x)
            offset += n
        writer.commit({"config_key": "synthetic-benchmark", "classes": names, "backbone": {"name": "synthetic"}})
    return sizes


# ----------------------------------------------------------------------------- one case per process
def rss_mb() -> float:
    """Current resident set size in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_case(case: str, cache: Path, budget_gb: float, epochs: int, batch_size: int, lr: float,
             c_grid: list[float], seed: int) -> dict:
    import torch
    from sklearn.linear_model import SGDClassifier  # noqa: F401  (imported before the baseline, as in the stage)

    from pipeline import cache as fc
    from pipeline.config import HeadConfig, LogisticConfig
    from pipeline.engine import to_tensors
    from pipeline.head import fit_head, streamed_batches, train_head
    from pipeline.logistic import fit_logistic_streamed, predict_proba_streamed
    from pipeline.stream import budget_bytes

    baseline = peak_rss_mb()
    budget = budget_bytes(budget_gb)
    cfg = HeadConfig(epochs=epochs, batch_size=batch_size, lr=lr)
    device = torch.device("cpu")
    out = {"case": case, "baseline_mb": baseline}
    if case == "head-streamed":
        with fc.open_features(cache) as reader:
            n_classes = len(reader.classes)
            train, val = streamed_batches(reader, batch_size, budget_gb, seed)  # as the head stage does
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            result = fit_head(torch.nn.Linear(reader.feature_dim, n_classes), train, val, cfg, device, seed)
            seconds = time.perf_counter() - t0
            out.update(rows=reader.train.n_rows, passes=epochs, val_acc=result.best_acc,
                       buffer_mb=(train.nbytes + val.nbytes) / 2 ** 20, chunk_reads=train.chunk_reads)
    elif case == "head-in-memory":
        t0 = time.perf_counter()
        features = fc.read_cache(cache)
        x, y = to_tensors(features.train)
        vx, vy = to_tensors(features.val)
        load = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = train_head(x, y, vx, vy, len(features.classes), cfg, device, seed)
        seconds = time.perf_counter() - t0
        out.update(rows=len(y), passes=epochs, val_acc=result.best_acc, load_seconds=load)
    elif case == "logistic-streamed":
        lcfg = LogisticConfig(c_grid=c_grid, sgd_epochs=epochs)
        with fc.open_features(cache) as reader:
            t0 = time.perf_counter()
            fit = fit_logistic_streamed(reader.train, lcfg, seed, budget)
            seconds = time.perf_counter() - t0
            probs = predict_proba_streamed(fit.model, reader.val, len(reader.classes), budget)
            out.update(rows=reader.train.n_rows, passes=fit.passes, C=fit.best_c,
                       val_acc=float(np.mean(probs.argmax(1) == reader.val.labels)),
                       buffer_mb=fit.buffer_bytes / 2 ** 20, chunk_reads=fit.chunk_reads)
    else:
        raise SystemExit(f"unknown case '{case}' (head-streamed, logistic-streamed, head-in-memory)")
    out.update(seconds=seconds, peak_mb=peak_rss_mb())
    return out


def evict(path: Path) -> None:
    """Drop the file's pages from the OS page cache (they are clean), so the next read comes from disk."""
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def child(case: str, args: argparse.Namespace, cache: Path) -> dict:
    if args.cold:
        evict(cache)
    cmd = [sys.executable, __file__, "--case", case, "--cache", str(cache), "--budget-gb", str(args.budget_gb),
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
           "--seed", str(args.seed), "--c-grid", *map(str, args.c_grid)]
    print(f"running {case} ...", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{case} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-gb", type=float, default=2.0, help="float32 features in the cache, GiB (default 2.0)")
    p.add_argument("--budget-gb", type=float, default=0.5, help="head.max_memory_gb of the streamed cases (default 0.5)")
    p.add_argument("--epochs", type=int, default=2,
                   help="head epochs and logistic.sgd_epochs (default 2; the stage defaults are 25 and 20)")
    p.add_argument("--batch-size", type=int, default=256, help="head batch size (default 256)")
    p.add_argument("--lr", type=float, default=0.01, help="head learning rate (default 0.01)")
    p.add_argument("--c-grid", type=float, nargs="+", default=[0.01, 0.1, 1.0],
                   help="logistic C values, all fed from each read (default 0.01 0.1 1.0)")
    p.add_argument("--dim", type=int, default=1280, help="feature_dim (default 1280, EfficientNet-Lite0)")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    p.add_argument("--separation", type=float, default=0.08,
                   help="scale of the class means against unit noise (default 0.08)")
    p.add_argument("--seed", type=int, default=0, help="data and training seed (default 0)")
    p.add_argument("--dir", default=None, help="folder for the cache (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the cache file afterwards (default: delete it)")
    p.add_argument("--skip-in-memory", action="store_true", help="skip the in-memory head (default: run it)")
    p.add_argument("--cold", action="store_true",
                   help="evict the cache file from the OS page cache before each case, so its first pass reads "
                        "the disk (default: off; later passes find what the page cache kept)")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = get_args_parser().parse_args()
    if args.case:  # a child process: one case, one JSON line
        print(json.dumps(run_case(args.case, Path(args.cache), args.budget_gb, args.epochs, args.batch_size,
                                  args.lr, args.c_grid, args.seed)))
        return
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="stream-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    n_rows = int(args.cache_gb * GIB) // (4 * args.dim)
    need = n_rows * args.dim * 4 * 1.05 + 2 ** 28
    free = shutil.disk_usage(folder).free
    if free < need:
        raise SystemExit(f"'{folder}' has {free / GIB:.1f} GiB free; the cache needs {need / GIB:.1f} GiB: "
                         "free space, pass --dir on a larger disk, or lower --cache-gb")
    cache = folder / "synthetic-stream-bench.h5"
    try:
        t0 = time.perf_counter()
        sizes = build_cache(cache, n_rows, args.dim, args.classes, args.separation, args.seed)
        print(f"cache {cache}: {sizes['train']:,} train + {sizes['val']:,} val rows x {args.dim} float32 = "
              f"{n_rows * args.dim * 4 / GIB:.2f} GiB of features, {cache.stat().st_size / GIB:.2f} GiB on disk, "
              f"written in {time.perf_counter() - t0:.1f} s")
        cases = ["head-streamed", "logistic-streamed"] + ([] if args.skip_in_memory else ["head-in-memory"])
        results = [child(case, args, cache) for case in cases]
    finally:
        if args.keep:
            print(f"kept {cache}")
        elif args.dir:
            cache.unlink(missing_ok=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    budget_mb = args.budget_gb * 1024
    rows = []
    for r in results:
        extra = r["peak_mb"] - r["baseline_mb"]
        rows.append((r["case"], f"{r['peak_mb']:.0f}", f"{r['baseline_mb']:.0f}", f"{extra:.0f}",
                     f"{r['rows'] * r['passes'] / r['seconds']:,.0f}", r["passes"], f"{r['seconds']:.1f}",
                     f"{r['val_acc']:.4f}", "yes" if extra <= budget_mb else "no"))
    print(f"\nbudget {args.budget_gb:g} GiB ({budget_mb:.0f} MiB); head: {args.epochs} epochs, batch {args.batch_size}, "
          f"lr {args.lr:g}; logistic: sgd_epochs {args.epochs}, C grid {args.c_grid}; page cache "
          f"{'evicted before each case' if args.cold else 'warm (the file was just written)'}")
    print(table(rows, ("case", "peak RSS MiB", "after imports MiB", "peak - imports MiB", "samples/s", "passes",
                       "train s", "val acc", "under budget")))
    for r in results:
        notes = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()
                 if k in ("buffer_mb", "chunk_reads", "C", "load_seconds")}
        if notes:
            print(f"  {r['case']}: {notes}")
    print("samples/s = train rows x passes over them / training seconds (head: epochs, with a val pass each; "
          "logistic: 1 scaler pass + sgd_epochs for the C grid + sgd_epochs for the refit).")


if __name__ == "__main__":
    main()
