"""torch.distributed set-up for torchrun: one process per device, gloo on CPU and NCCL on GPU."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass
class DistributedContext:
    """This process's place in the job: rank, world size and the device it trains on.

    Without torchrun (no ``WORLD_SIZE`` in the environment) it describes a single process of rank 0.
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the one process that writes files and logs progress."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when torch.distributed is initialised and the job has more than one process."""
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait until every process reaches this point."""
        if self.is_distributed:
            dist.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Return ``values`` summed over all processes (a copy; the input is left unchanged)."""
        total = values.detach().clone().to(self.device)
        if self.is_distributed:
            dist.all_reduce(total)
        return total

    def broadcast_object(self, value):
        """Return rank 0's ``value`` on every process."""
        if not self.is_distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather_objects(self, value) -> list:
        """Return the list of every process's ``value``, ordered by rank."""
        if not self.is_distributed:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def close(self) -> None:
        """Leave the process group."""
        if self.is_distributed and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device: str) -> DistributedContext:
    """Join the torchrun job described by the environment, or describe a single process.

    Args:
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``. Under torchrun each process takes the GPU of
            its local rank; ``cpu`` uses the gloo backend.
    """
    from dagman_core.inference.pipeline import resolve_device

    requested = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistributedContext(rank=0, local_rank=0, world_size=1, device=requested)

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if requested.type == "cuda":
        torch.cuda.set_device(local_rank)
        process_device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        process_device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    logger.debug("rank %d of %d joined the %s process group on %s", rank, world_size, backend, process_device)
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=process_device)
