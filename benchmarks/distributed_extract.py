"""Distributed extraction (torchrun, N processes) against one process, on the same images, side by side.

    python benchmarks/distributed_extract.py [--data demo:digits] [--nproc 2] [--repeat 1] [--merge-rows 200000]

Each run extracts into an empty cache folder in a fresh process (or torchrun job) and reports:
wall time of the whole command, forward throughput (images / slowest rank's backbone time), the
time rank 0 spends merging every rank's chunk files into the one complete cache (the merge this
project chose over an HDF5 virtual dataset), and whether the two caches agree: same key, rows and
order, and the largest feature difference.

On a CPU, one process with T threads and N processes with T/N threads each share the same cores,
so expect a ratio near 1 there; the gain comes with one process per GPU.

--merge-rows R then times the merge alone at scale: R synthetic feature rows (feature_dim 1280,
float32) saved as chunk files of `--chunk-rows`, as ranks save them, merged into one cache file.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
import numpy as np

from _common import REPO, table
from pipeline import cache as fc


def run_extract(launcher: list[str], params: str, data: str, work: Path, name: str, env: dict) -> tuple[float, dict]:
    """Wall seconds and the metrics entry of one extract run into its own empty cache folder."""
    cmd = launcher + [str(REPO / "run_pipeline.py"), "extract", "--params", params,
                      "--set", f"data.root={data}", "--set", f"extract.cache_dir={work / name}",
                      "--set", f"run.output_dir={work / 'runs'}", "--set", f"run.name={name}"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    entry = json.loads((work / "runs" / name / "metrics.json").read_text())["extract"]
    assert not entry["cache_hit"], entry
    return seconds, entry


def compare(a: Path, b: Path) -> tuple[bool, float]:
    """(same key, rows and order; largest absolute feature difference)."""
    ca, cb = fc.read_cache(a), fc.read_cache(b)
    same = ca.attrs["key"] == cb.attrs["key"] and all(
        ca.splits[s].paths == cb.splits[s].paths and ca.splits[s].sha256 == cb.splits[s].sha256 for s in fc.SPLITS)
    diff = max(float(np.abs(ca.splits[s].features - cb.splits[s].features).max()) for s in fc.SPLITS)
    return same, diff


def time_merge(work: Path, n_rows: int, chunk_rows: int, feature_dim: int = 1280) -> tuple[float, float]:
    """(seconds, MB/s) to merge n_rows synthetic rows from chunk files into one complete cache."""
    rng = np.random.default_rng(0)
    hashes = [f"{i:064x}" for i in range(n_rows)]
    store = fc.ChunkStore(work / "merge.partial", "synthetic", "float32")
    block = rng.standard_normal((chunk_rows, feature_dim), dtype=np.float32)
    for start in range(0, n_rows, chunk_rows):
        part = hashes[start:start + chunk_rows]
        store.write(part, block[:len(part)])
    n_train = n_rows * 3 // 4
    manifests = {"train": fc.SplitManifest(tuple(hashes[:n_train]), (0,) * n_train, tuple(hashes[:n_train])),
                 "val": fc.SplitManifest(tuple(hashes[n_train:]), (0,) * (n_rows - n_train), tuple(hashes[n_train:]))}
    rows, _ = store.rows()  # verifies every chunk's checksums, as rank 0 does before merging
    t0 = time.perf_counter()
    fc.assemble_cache(work / "merged.h5", manifests, feature_dim, "float32", rows,
                      {"config_key": "synthetic", "classes": ["x"]})
    seconds = time.perf_counter() - t0
    return seconds, n_rows * feature_dim * 4 / 1e6 / seconds


def cache_file(folder: Path) -> Path:
    [path] = [p for p in folder.glob("*.h5") if not p.name.startswith("scan-")]
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="demo:digits", help="data.root (default: demo:digits)")
    parser.add_argument("--params", default=str(REPO / "params.json"), help="params file (default: params.json)")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes (default: 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="CPU threads in all: the single process gets them all, each rank its share "
                             "(default: all cores)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, interleaved; best kept (default: 1)")
    parser.add_argument("--merge-rows", type=int, default=0,
                        help="also time merging this many synthetic 1280-dim rows (default: 0, skip)")
    parser.add_argument("--chunk-rows", type=int, default=512, help="rows per chunk file for --merge-rows "
                        "(default: 512, extract.chunk_size's default)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dist-extract-"))
    env = dict(os.environ)
    single_env = {**env, "OMP_NUM_THREADS": str(args.threads)}
    dist_env = {**env, "OMP_NUM_THREADS": str(max(1, args.threads // args.nproc))}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    best: dict[str, tuple[float, dict, str]] = {}
    try:
        for r in range(args.repeat):
            for label, launcher, run_env in (("1 process", [sys.executable], single_env),
                                             (f"torchrun x{args.nproc}", torchrun, dist_env)):
                name = f"{'single' if launcher == [sys.executable] else 'dist'}{r}"
                seconds, entry = run_extract(launcher, args.params, args.data, work, name, run_env)
                if label not in best or seconds < best[label][0]:
                    best[label] = (seconds, entry, name)
        (s1, e1, n1), (s2, e2, n2) = best.values()
        same, diff = compare(cache_file(work / n1), cache_file(work / n2))
        rows = []
        for label, (seconds, entry, _) in best.items():
            share = entry.get("assemble_seconds", 0) / seconds
            rows.append((label, entry["rows_extracted"], f"{seconds:.1f}", entry["images_per_second"],
                         f"{entry.get('assemble_seconds', 0):.2f}", f"{100 * share:.1f}%",
                         entry.get("rows_per_process", [])))
        print(table(rows, ("run", "images", "wall s", "forward img/s", "merge s", "merge share", "rows per process")))
        print(f"\nwall-time ratio (1 process / torchrun x{args.nproc}): {s1 / s2:.2f}; "
              f"forward img/s ratio: {e2['images_per_second'] / e1['images_per_second']:.2f}")
        print(f"caches agree (key, rows, order): {same}; largest feature difference: {diff:.3g}")
        if args.merge_rows:
            seconds, rate = time_merge(work, args.merge_rows, args.chunk_rows)
            size = args.merge_rows * 1280 * 4 / 1e9
            print(f"merge at scale: {args.merge_rows} rows x 1280 float32 ({size:.2f} GB) from "
                  f"{-(-args.merge_rows // args.chunk_rows)} chunk files in {seconds:.1f} s ({rate:.0f} MB/s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
