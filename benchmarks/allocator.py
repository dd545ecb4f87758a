"""run.reuse_memory side by side: the backbone's forward passes (extraction) and SGD steps (finetune) in
fresh processes with glibc's malloc as it is and with pipeline.malloc's setting, alternating.

    python benchmarks/allocator.py [--params params.json] [--rounds 2] [--images 256] [--steps 6]

Each process builds params.json's backbone (backbone.* as set there), warms it up with one pass, then
times --images images of random input at extract.batch_size through the frozen extractor, and --steps
SGD steps at finetune.batch_size through the whole network. It prints images/s, the process's system
seconds and minor page faults over the timed part, its peak resident memory, and the ratio of each
round's two rates. The load average is printed at start and end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from _common import REPO, table


def child(params: str, reuse: bool, images: int, steps: int) -> dict:
    """One process's measurements (run with --child)."""
    import resource
    import time

    if reuse:
        from pipeline.malloc import reuse_freed_memory
        assert reuse_freed_memory(), "not glibc: nothing to compare"
    import torch

    from pipeline.backbones import build_classifier, build_feature_extractor, resolve_backbone
    from pipeline.config import load_config

    cfg = load_config(params, [])
    spec = resolve_backbone(cfg.backbone, cfg.run.seed)
    size = spec.preprocess.crop_size
    out = {}

    def timed(name: str, fn, n_images: int, repeat: int) -> None:
        fn()                                                   # warm-up (not timed)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(repeat):
            fn()
        seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        out[name] = {"images_per_second": n_images * repeat / seconds, "sys_seconds": r1.ru_stime - r0.ru_stime,
                     "minor_faults": r1.ru_minflt - r0.ru_minflt}

    extractor = build_feature_extractor(cfg.backbone, spec).eval()
    x = torch.randn(cfg.extract.batch_size, 3, size, size)

    def forward():
        with torch.inference_mode():
            extractor(x)

    timed("extract", forward, len(x), max(1, images // len(x)))
    net = build_classifier(cfg.backbone, spec, 5, seed=cfg.run.seed).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    xb = torch.randn(cfg.finetune.batch_size, 3, size, size)
    yb = torch.randint(0, 5, (len(xb),))

    def sgd_step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xb), yb).backward()
        opt.step()

    timed("finetune", sgd_step, len(xb), steps)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(REPO / "params.json"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=256, help="images timed through the extractor per process")
    parser.add_argument("--steps", type=int, default=6, help="finetune SGD steps timed per process")
    parser.add_argument("--child", choices=["reuse", "default"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.params, args.child == "reuse", args.images, args.steps)))
        return
    print(f"load average at start: {os.getloadavg()}", flush=True)
    rows, ratios = [], {"extract": [], "finetune": []}
    for r in range(1, args.rounds + 1):
        got = {}
        for mode in ("default", "reuse"):
            cmd = [sys.executable, __file__, "--child", mode, "--params", args.params, "--images", str(args.images),
                   "--steps", str(args.steps)]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{mode} process failed:\n{proc.stderr[-2000:]}")
            got[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            for part in ("extract", "finetune"):
                m = got[mode][part]
                rows.append((r, mode, part, f"{m['images_per_second']:.1f}", f"{m['sys_seconds']:.2f}",
                             m["minor_faults"], f"{got[mode]['peak_rss_mib']:.0f}"))
        for part in ratios:
            ratios[part].append(got["reuse"][part]["images_per_second"] / got["default"][part]["images_per_second"])
    print(table(rows, ("round", "malloc", "part", "img/s", "sys s", "minor faults", "peak RSS MiB")))
    for part, values in ratios.items():
        print(f"{part}: reuse / default images per second, {len(values)} rounds: "
              f"{' '.join(f'{v:.2f}x' for v in values)}; median {statistics.median(values):.2f}x")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
