"""Frozen-backbone forward speed of several backbones, interleaved, at each one's own input size.

    python benchmarks/backbone_throughput.py [--backbones efficientnet_lite0 efficientnet_lite1 ...]

On a shared machine, absolute images/s drift with the other work; timing the backbones in turns
(one batch each, round after round) exposes them to the same load, so their ratios hold. Each
backbone's best round is reported (the least disturbed), with its ratio to the first backbone.
Inputs are random tensors at the backbone's crop size: decoding and resizing are left out.
"""
from __future__ import annotations

import argparse
import os

import _common  # noqa: F401  (puts the repo on sys.path)
import torch

from _common import table
from pipeline.backbones import build_feature_extractor, resolve_backbone
from pipeline.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite1",
                                                           "efficientnet_lite2", "resnet18@none"],
                        help="names as in benchmark.backbones (name@weights allowed; default: the three Lites "
                             "and resnet18 with random weights)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of one batch per backbone (default: 5)")
    parser.add_argument("--image-size", type=int, default=None, help="crop size for all (default: each one's own)")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = []
    for entry in args.backbones:
        name, _, weights = entry.partition("@")
        overrides = [f"backbone.name={name}", f"backbone.weights={weights or 'DEFAULT'}"]
        if args.image_size:
            overrides.append(f"backbone.image_size={args.image_size}")
        cfg = load_config(None, overrides)
        spec = resolve_backbone(cfg.backbone, cfg.run.seed)
        extractor = build_feature_extractor(cfg.backbone, spec).to(memory_format=torch.channels_last)
        size = spec.preprocess.crop_size
        x = torch.randn(args.batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            extractor(x)  # warm-up: oneDNN picks its kernels on the first call
        models.append((entry, size, extractor, x))
    best = {entry: float("inf") for entry, *_ in models}
    for _ in range(args.rounds):
        for entry, _, extractor, x in models:
            with torch.inference_mode():
                t0 = _common.time.perf_counter()
                extractor(x)
                best[entry] = min(best[entry], _common.time.perf_counter() - t0)
    first = args.batch_size / best[models[0][0]]
    rows = [(entry, size, f"{args.batch_size / best[entry]:.1f}", f"{args.batch_size / best[entry] / first:.2f}")
            for entry, size, *_ in models]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"best of {args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.2f}")
    print(table(rows, ("backbone", "px", "images/s", f"vs {models[0][0]}")))


if __name__ == "__main__":
    main()
