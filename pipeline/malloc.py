"""Keep freed memory in the process for reuse (glibc's malloc), so large tensors stop costing page faults.

torch's CPU tensors come from malloc. glibc serves a request above its mmap threshold (at most 32 MiB)
with a fresh mmap and gives it back on free, and it trims the heap's free top; a backbone's activations
(EfficientNet-Lite0 at 224 px, a batch of 64: 103 MB for the first layer's output) are then mapped,
faulted in page by page, zeroed by the kernel and unmapped on every forward pass. On a 2-core VM that
took more system time than the convolutions: 16.5-23.5 img/s at batch 64 with 11.5-16 s of system time
per 256 images, 50.7-53.2 img/s with this setting; the extract stage 22-27 against 40-47 img/s
(benchmarks/allocator.py, docs/benchmarks.md "The allocator"). It is what the jemalloc / tcmalloc
advice for PyTorch on CPUs buys, with no preload: M_MMAP_MAX 0 (every block from the heap) and
M_TRIM_THRESHOLD at its maximum (freed memory stays for the next request). The process's resident
memory then stays at its peak instead of shrinking between passes.

Process-wide and one-way: the CLI applies it when it starts (run.reuse_memory, default true), the API
when load_features extracts; other C libraries and platforms are left as they are.
"""
from __future__ import annotations

import ctypes
import platform
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4   # glibc's mallopt parameters (malloc.h)


def reuse_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse (see the module docstring; setting it again changes
    nothing); True when set. Does nothing (False) on other platforms or C libraries."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")                 # glibc's soname on Linux
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
