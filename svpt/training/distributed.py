"""Process-group plumbing for ``torchrun --nproc_per_node=N -m svpt train``; a single
process is the special case world size 1 with no process group."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def sum(self, values: list[float] | torch.Tensor) -> torch.Tensor:
        """Elementwise sum over processes (float64 on this device)."""
        t = torch.as_tensor(values, dtype=torch.float64, device=self.device).clone()
        if self.active:
            dist.all_reduce(t)
        return t

    def gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def setup(device: str | None) -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK), if any, and
    pick this process's device: cuda:LOCAL_RANK under torchrun, else ``device`` or the best."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    wanted = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if wanted.type == "cuda":
        wanted = torch.device("cuda", local_rank if world > 1 else (wanted.index or 0))
        torch.cuda.set_device(wanted)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if wanted.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank, device=wanted)


def teardown(ctx: Dist) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()


class ShardSampler(Sampler[int]):
    """Evaluation sharding without padding: process r reads indices r, r+W, r+2W, ...; the sums
    reduced over processes then count every image exactly once."""

    def __init__(self, length: int, rank: int, world: int):
        self.indices = range(rank, length, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
