"""Device, seeding and environment facts shared by every stage (no module-level state)."""
from __future__ import annotations

import contextlib
import os
import platform
import random
import signal
import sys
import threading

import numpy as np
import torch

from pipeline import PipelineError


def resolve_device(name: str) -> torch.device:
    """Turn run.device ('auto', 'cpu', 'cuda', 'cuda:1', 'mps') into a torch.device that exists."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise PipelineError(f"run.device '{name}' is not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"run.device '{name}' asked for CUDA but torch sees no CUDA device "
                            "(use run.device=auto or cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise PipelineError(f"run.device '{name}': only {torch.cuda.device_count()} CUDA device(s) present")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PipelineError(f"run.device '{name}' asked for MPS but it is not available (use auto or cpu)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise PipelineError(f"run.device '{name}' is not supported (use auto, cpu, cuda, cuda:N or mps)")
    return device


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's or taskset's share, not the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


LIGHT_HEADS = ("linear", "knn", "ncm")   # head types whose work is small per operator: one thread


def stage_threads(stage: str, head_type: str, requested: int) -> int:
    """torch intra-op threads for a stage: run.num_threads when set, else what the stage's work can use.

    A linear head (and the logistic stage, whose solver uses its own BLAS threads) runs thousands of tiny
    operators; extra intra-op threads only add synchronisation, which on a machine other jobs are using
    costs far more than it saves (25 epochs of a batch-4 head on 1,200 rows: 10 to 15 s with 2 threads,
    0.6 s with 1, load average 7 on 2 cores). Convolutions (extract, finetune, predict, report on images),
    the big dense layers of head.type=classifier, and the window GEMMs of an mlp head and of a sweep's
    joint groups use every core the process is allowed: their per-step ops run on one thread anyway
    (lazy_sgd.small_ops). The 72-configuration digits sweep took 7.6-7.8 s on 2 threads against
    8.9-9.3 s on 1, and beside two busy neighbours 11.7-13.8 s against 13.8-15.1 s (docs/heads.md).
    """
    if requested:
        return requested
    if stage in ("logistic", "leaderboard") or (stage == "head" and head_type in LIGHT_HEADS):
        return 1
    return available_cores()


def apply_stage_threads(stage: str, head_type: str, requested: int) -> int:
    n = stage_threads(stage, head_type, requested)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def subnormals_flushed() -> bool:
    """Whether this thread flushes subnormal floats now (a float64 1e-40 becomes float32 zero)."""
    return torch.tensor([1e-40]).item() == 0.0


@contextlib.contextmanager
def flushed_subnormals():
    """Subnormal floats (below 1.2e-38) read and written as zero on this thread while inside (torch's
    set_flush_denormal; restored after, left alone if already on). A confident head's softmax underflows
    into them (and lazy_sgd's momentum coefficients decay by m^64 a window); on x86 each op on them takes a
    microcode assist: on the digits features 24 joint heads took 9.3 s instead of 0.87, and one head at lr
    0.3 on the engine loop 1.85 s instead of 1.05 (docs/heads.md). Only this thread: torch's other
    threads keep their setting, so lazy_sgd makes every write into its coefficients here (small_ops).
    Also a decorator (`@flushed_subnormals()`), as every contextlib.contextmanager is."""
    if subnormals_flushed() or not torch.set_flush_denormal(True):   # already on, or unsupported
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def environment_info(device: torch.device) -> dict:
    """Versions and hardware facts recorded next to results (torchvision's without importing it)."""
    torchvision = sys.modules.get("torchvision")
    info = {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__) if torchvision else _installed_version("torchvision"),
        "numpy": str(np.__version__),
        "pillow": _pillow_version(),
        "device": str(device),
        "num_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _installed_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _pillow_version() -> str:
    import PIL

    return str(PIL.__version__)


class GracefulInterrupt:
    """Within the block, a first Ctrl-C only sets `requested` (the loop finishes its step and stops
    cleanly); a second one raises KeyboardInterrupt at once. Outside the main thread it does nothing.
    """

    def __init__(self, message: str) -> None:
        self.message = message
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{self.message}", file=sys.stderr, flush=True)

    def __enter__(self) -> "GracefulInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def is_rank_zero() -> bool:
    """True unless this process is a torchrun worker other than rank 0 (read from torch's process group)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def progress(iterable=None, **kwargs):
    """A tqdm bar that refreshes often in a terminal and every 30 s in a log file; rank 0's only under torchrun."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    kwargs.setdefault("disable", not is_rank_zero())
    return tqdm(iterable, mininterval=0.2 if interactive else 30.0, dynamic_ncols=interactive, **kwargs)
