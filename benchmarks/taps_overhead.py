"""What backbone.taps costs: the forward pass with several taps against pool alone, interleaved.

    python benchmarks/taps_overhead.py [--backbone efficientnet_lite0] [--taps stage-1 stage-2 concat]

Both extractors are the same network (same weights, batch norm folded, channels_last); the tapped one
adds forward hooks that pool the stage outputs inside the same pass. They are timed in turns (one
batch each, round after round) so that both see the same load; the best round of each is reported,
with their ratio, and the pool features of both are checked to be bitwise equal. Random inputs at
the backbone's crop size: decoding and resizing are left out.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import _common  # noqa: F401  (puts the repo on sys.path)
import torch

from _common import table
from pipeline.backbones import build_feature_extractor, resolve_backbone
from pipeline.config import load_config
from pipeline.taps import tapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0", help="backbone.name (default: efficientnet_lite0)")
    parser.add_argument("--taps", nargs="+", default=["stage-1", "stage-2", "concat"],
                        help="taps besides pool (default: stage-1 stage-2 concat)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of one batch per extractor (default: 6)")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config(None, [f"backbone.name={args.backbone}", f"backbone.taps={json.dumps(['pool', *args.taps])}"])
    spec = resolve_backbone(cfg.backbone, cfg.run.seed)
    size = spec.preprocess.crop_size
    plain = build_feature_extractor(cfg.backbone, spec, seed=0).to(memory_format=torch.channels_last)
    taps = tapped(build_feature_extractor(cfg.backbone, spec, seed=0).to(memory_format=torch.channels_last),
                  spec.taps, size, spec.name)
    x = torch.randn(args.batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
    best = {"pool only": float("inf"), "taps": float("inf")}
    with torch.inference_mode():
        assert torch.equal(plain(x), taps(x)["pool"])  # also the warm-up: oneDNN picks its kernels
        for _ in range(args.rounds):
            for name, extractor in (("pool only", plain), ("taps", taps)):
                t0 = time.perf_counter()
                extractor(x)
                best[name] = min(best[name], time.perf_counter() - t0)
    rows = [(name, f"{args.batch_size / s:.1f}", f"{s / best['pool only']:.3f}") for name, s in best.items()]
    print(f"{args.backbone} at {size} px, taps {list(spec.taps)}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, batch {args.batch_size}, best of {args.rounds} interleaved rounds; load average "
          f"{os.getloadavg()[0]:.2f}")
    print(table(rows, ("extractor", "images/s", "time vs pool only")))


if __name__ == "__main__":
    main()
