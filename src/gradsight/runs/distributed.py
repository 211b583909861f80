"""torch.distributed glue: rank / world size, deterministic sharding of examples, barriers.

Every command runs unchanged under `torchrun --nproc_per_node N`: rank r takes every N-th example of a fixed
order, writes its own shards, and rank 0 merges and reports after a barrier. gloo on CPU, NCCL on GPUs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init", "barrier", "shard", "finalize", "pick_device"]

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return DistInfo()
    here = False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        here = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), here)


def barrier(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.barrier()


def broadcast_object(info: DistInfo, obj):
    """rank 0's object on every rank."""
    if info.world_size <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: Sequence[T], info: DistInfo) -> list[T]:
    """This rank's deterministic share of `items` (every world_size-th, starting at rank)."""
    return list(items[info.rank :: info.world_size])


def finalize(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session() -> Iterator[DistInfo]:
    """`init()` for the duration of a run; the process group it created is destroyed afterwards, even on error."""
    info = init()
    try:
        yield info
    finally:
        finalize(info)


def pick_device(spec: str, info: DistInfo) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{info.local_rank}")
        return torch.device("cpu")
    return torch.device(spec)
