"""torchrun entry point for tests: run_pipeline.main, optionally killing one rank mid-extraction.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_child.py [run_pipeline args]

With KILL_RANK=r and KILL_AFTER_CHUNKS=k in the environment, rank r sends itself SIGKILL right
after saving its k-th chunk, as a crash or an OOM kill would; torchrun then stops the other ranks.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _kill_after_chunks(k: int) -> None:
    from pipeline import cache as fc

    write = fc.ChunkStore.write
    written = []

    def write_then_die(self, *args, **kwargs):
        path = write(self, *args, **kwargs)
        written.append(path)
        if len(written) >= k:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    fc.ChunkStore.write = write_then_die


if __name__ == "__main__":
    if os.environ.get("KILL_RANK") == os.environ.get("RANK"):
        _kill_after_chunks(int(os.environ["KILL_AFTER_CHUNKS"]))
    import run_pipeline

    sys.exit(run_pipeline.main(sys.argv[1:]))
