"""Multi-process training with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Launched by ``torchrun --nproc_per_node N -m gemmaforge train CONFIG.yaml``; torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK, which is how a run knows it is distributed. Each process holds 1/N of
every parameter, gradient and optimizer state; a transformer block's weights are all-gathered just
before it runs and freed after (``fully_shard`` per block, then once more for the root, which owns
the embedding and final norm of the student -- and of the teacher, when distilling).

The backend is NCCL on GPUs and gloo on CPUs (CI tests 2 CPU processes). Each process computes the
summed loss of its share of the global batch and divides by the *global* number of label tokens,
times N because FSDP averages gradients over processes: the update equals the 1-process update on
the same global batch, up to floating-point summation order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import GemmaforgeError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise GemmaforgeError("device: cuda was requested but no GPU is visible: set device: cpu")
        dev = torch.device("cuda", local_rank if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def shard(root: nn.Module, blocks: list[nn.Module], info: DistInfo) -> nn.Module:
    """FSDP2: one unit per transformer block (student's and teacher's), then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(root, mesh=mesh)
    return root


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value of a small picklable object, on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (sharded) -> the whole tensor; plain tensors pass through."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
