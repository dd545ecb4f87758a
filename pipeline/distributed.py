"""Multi-process runs launched by torchrun: process group, rank facts and object collectives.

    torchrun --nproc_per_node=N run_pipeline.py extract finetune
    torchrun --nnodes=M --nproc_per_node=N --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT run_pipeline.py ...

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE in every worker's environment; without them (a
plain `python run_pipeline.py`) nothing here starts a process group and the context is `SINGLE`,
whose collectives are identities, so single-process code paths stay exactly as they were.

No module state: `init_distributed` returns a `DistContext` (rank, world size, the wait group),
which the CLI hands to the stages that split their work; the others run on rank 0 as `SINGLE`.

Backends: NCCL for CUDA tensors (gradients in DDP), gloo for CPU tensors and for the small
Python objects the ranks exchange (plans, work lists, outcomes). Waits for rank 0's own work
(scanning, assembling a cache, a stage only rank 0 runs) go through a second gloo group whose
timeout is `run.dist_timeout_min`, so a long assembly is not mistaken for a hung peer.

Failure: if any rank exits with an error, torchrun stops the others; nothing half-written is
ever published (see pipeline/cache/__init__.py), so the same command can simply be run again.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from pipeline import PipelineError

T = TypeVar("T")


@dataclass(frozen=True)
class Launch:
    """What torchrun told this process about itself."""

    rank: int
    local_rank: int
    world_size: int


@dataclass(frozen=True)
class DistContext:
    """The distributed facts of this process, created once by `init_distributed` and passed to the stages
    that split their work (extract, finetune); every other stage runs on rank 0 as `SINGLE`.

    world_size 1 (a plain run, or a stage rank 0 runs alone): every collective is an identity.
    wait_group: the gloo group with the long timeout (run.dist_timeout_min) for waits on rank 0's work.
    """

    rank: int = 0
    world_size: int = 1
    wait_group: Optional[dist.ProcessGroup] = field(default=None, compare=False, repr=False)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, or the only process: the one that writes run-folder files and prints summaries."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank gets here (long timeout: one rank may be doing rank-0-only work)."""
        if self.is_distributed:
            dist.barrier(group=self.wait_group)

    def broadcast(self, obj: T, src: int = 0) -> T:
        """Rank src's obj on every rank (pickled; for plans and work lists, not tensors)."""
        if not self.is_distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, group=self.wait_group)
        return box[0]

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's obj, indexed by rank."""
        if not self.is_distributed:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.wait_group)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run fn on rank 0 only and hand its result to every rank (others wait)."""
        return self.broadcast(fn() if self.is_main else None)

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Copy rank 0's buffers (batch-norm running statistics) to every rank.

        DDP broadcasts them before each training forward, but the last step's forward then updates
        them locally; evaluating without this would score each val slice with slightly different
        statistics from the model rank 0 saves.
        """
        if self.is_distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def shard(self, items: list[T]) -> list[T]:
        """This rank's items: every world_size-th, starting at its rank (disjoint, together complete)."""
        return items[self.rank::self.world_size]


SINGLE = DistContext()  # a plain single-process run


def launch_from_env(env: Optional[dict] = None) -> Optional[Launch]:
    """The torchrun launch this process belongs to, or None for a plain single-process run."""
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        launch = Launch(int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"])), int(env["WORLD_SIZE"]))
    except ValueError:
        raise PipelineError(f"RANK={env.get('RANK')!r} WORLD_SIZE={env.get('WORLD_SIZE')!r}: not integers; "
                            "launch with torchrun, which sets them") from None
    return launch if launch.world_size > 1 else None


def init_distributed(device: torch.device, timeout_min: float) -> DistContext:
    """Join the torchrun job (if any) and return this process's context; device must come from `rank_device`."""
    launch = launch_from_env()
    if launch is None:
        return SINGLE
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size())
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise PipelineError(f"RANK and WORLD_SIZE are set but {name} is not: launch with torchrun "
                                "(torchrun --nproc_per_node=N run_pipeline.py ...)")
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, **kwargs)
    wait_group = dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_min))
    return DistContext(dist.get_rank(), dist.get_world_size(), wait_group)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device, launch: Optional[Launch]) -> torch.device:
    """One GPU per process on a node: cuda:LOCAL_RANK (run.device cuda or auto on a CUDA machine)."""
    if launch is None or device.type != "cuda":
        return device
    if launch.local_rank >= torch.cuda.device_count():
        raise PipelineError(f"local rank {launch.local_rank} has no GPU: this node has "
                            f"{torch.cuda.device_count()}; use --nproc_per_node={torch.cuda.device_count()} "
                            "or fewer")
    torch.cuda.set_device(launch.local_rank)
    return torch.device("cuda", launch.local_rank)


def unshard(parts: list[list[T]]) -> list[T]:
    """Inverse of `DistContext.shard` over every rank's part: items back in their original order."""
    out: list = [None] * sum(len(p) for p in parts)
    for r, part in enumerate(parts):
        out[r::len(parts)] = part
    return out


def host() -> str:
    return socket.gethostname()
