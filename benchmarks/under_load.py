"""No collapse under load: each job alone, then beside two more CPU-bound copies of itself.

    python benchmarks/under_load.py [--data demo:digits] [--kinds head,extract,finetune] [--neighbours 2]

Jobs (each a fresh `run_pipeline.py` process, start-up included, its own cache folder or run folder so
that no copy waits for another's lock):
- head: the warm `head` (cache already built, report.enabled=false);
- extract: extraction into an empty cache folder;
- finetune: one finetune epoch (report.enabled=false).
For each kind: the wall time alone, then 1 + --neighbours copies started together (three jobs on this
2-core machine by default). Prints each copy's time over the solo time; the goal is <= 3.5 (a job that
used both cores alone can at best be 3.0 with two neighbours).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)

from _common import REPO, table


def command(params: str, kind: str, sets: list[str], work: Path, copy: int) -> list[str]:
    own = {"head": [f"run.name=head{copy}"],
           "extract": [f"extract.cache_dir={work / f'extract{copy}'}", f"run.name=extract{copy}"],
           "finetune": ["finetune.epochs=1", f"run.name=finetune{copy}"]}[kind]
    return [sys.executable, str(REPO / "run_pipeline.py"), kind, "--params", params] + [
        a for s in sets + own for a in ("--set", s)]


def run_together(cmds: list[list[str]]) -> list[float]:
    """Start every command at once; each one's wall seconds."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    ends = [0.0] * len(procs)
    pending = set(range(len(procs)))
    while pending:
        for i in list(pending):
            if procs[i].poll() is not None:
                ends[i] = time.perf_counter() - t0
                pending.discard(i)
                if procs[i].returncode != 0:
                    sys.exit(f"{' '.join(cmds[i])} failed:\n{procs[i].stderr.read()[-2000:]}")
        time.sleep(0.05)
    return ends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.json"), help="params file (default params.json)")
    parser.add_argument("--data", default=None, help="data.root override (default: the params file's)")
    parser.add_argument("--kinds", default="head,extract,finetune", help="jobs to measure (default all three)")
    parser.add_argument("--neighbours", type=int, default=2, help="copies running beside the measured one (default 2)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="under_load-"))
    sets = [f"run.output_dir={work / 'runs'}", "report.enabled=false", f"extract.cache_dir={work / 'cache'}"] + (
        [f"data.root={args.data}"] if args.data else [])
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} before; work dir {work}", flush=True)
    warmup = [sys.executable, str(REPO / "run_pipeline.py"), "extract", "--params", args.params] + [
        a for s in sets + ["run.name=warmup"] for a in ("--set", s)]
    run_together([warmup])  # the cache the warm heads read
    rows = []
    for kind in args.kinds.split(","):
        solo = run_together([command(args.params, kind, sets, work, 0)])[0]
        together = run_together([command(args.params, kind, sets, work, 100 + i) for i in range(1 + args.neighbours)])
        ratios = [t / solo for t in together]
        rows.append((kind, f"{solo:.1f}", " ".join(f"{t:.1f}" for t in together), f"{max(ratios):.2f}",
                     "yes" if max(ratios) <= 3.5 else "no"))
        print(f"  {kind}: alone {solo:.1f} s, {1 + args.neighbours} at once {max(together):.1f} s", flush=True)
    print(table(rows, ("job", "alone s", f"with {args.neighbours} neighbours s", "worst ratio", "<= 3.5")))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
