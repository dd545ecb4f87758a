"""Linear-head training speed from a RAM-resident feature cache, against memory speed.

    python benchmarks/head_throughput.py [--samples 20000] [--batch-sizes 4 64 256 1024]

For feature_dim 1280 (EfficientNet-Lite0, ResNet-50 is 2048) and 25,088 (VGG's conv cut) it trains
the pipeline's own head loop (engine.train_one_epoch over TensorBatches, SGD + momentum) for one epoch
per batch size and prints samples/s, next to the rate at which the same features can merely be
read from memory (one pass of x.sum over a shuffled gather), measured in the same run.
"""
from __future__ import annotations

import argparse

import _common  # noqa: F401  (puts the repo on sys.path)
import torch
from torch import nn

from _common import best_of, table
from pipeline.engine import TensorBatches, make_sgd, train_one_epoch


def head_epoch_seconds(x: torch.Tensor, y: torch.Tensor, num_classes: int, batch_size: int, repeat: int) -> float:
    torch.manual_seed(0)
    head = nn.Linear(x.shape[1], num_classes)
    optimizer, _ = make_sgd(head.parameters(), 0.001, 0.9, 0.0, 7, 0.1)
    batches = TensorBatches(x, y, batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    criterion = nn.CrossEntropyLoss()
    device = torch.device("cpu")
    return best_of(lambda: train_one_epoch(head, criterion, optimizer, batches, device), repeat)


def memory_pass_seconds(x: torch.Tensor, repeat: int) -> float:
    """A shuffled read of every row once, in 4096-row gathers: what 'memory speed' means here."""
    def one_pass():
        order = torch.randperm(len(x))
        for start in range(0, len(x), 4096):
            x[order[start:start + 4096]].sum()
    return best_of(one_pass, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000, help="rows at feature_dim 1280 (default 20000)")
    parser.add_argument("--dims", type=int, nargs="+", default=[1280, 25088], help="feature dims (default 1280 25088)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 64, 256, 1024],
                        help="head batch sizes (default 4 64 256 1024)")
    parser.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N epochs per setting (default 3)")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu")
    rows = []
    for dim in args.dims:
        # Keep each cache near 100 MB so both dims fit comfortably in RAM and take similar time.
        n = max(1000, args.samples * 1280 // dim)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, dim, generator=g)
        y = torch.randint(0, args.classes, (n,), generator=g)
        mem_rate = n / memory_pass_seconds(x, args.repeat)
        for bs in args.batch_sizes:
            # Small batches are dominated by per-step overhead: time fewer rows so the run stays short.
            rows_used = min(n, 4000) if bs < 64 else n
            sec = head_epoch_seconds(x[:rows_used], y[:rows_used], args.classes, bs, args.repeat)
            rate = rows_used / sec
            rows.append((dim, bs, rows_used, f"{rate:,.0f}", f"{sec / (rows_used / bs) * 1e6:.0f}",
                         f"{mem_rate:,.0f}", f"{rate / mem_rate:.3f}"))
    print(table(rows, ("feature_dim", "batch", "rows", "samples/s", "us/step", "memory rows/s", "ratio")))


if __name__ == "__main__":
    main()
