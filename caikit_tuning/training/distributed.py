"""Data parallelism: several processes, each on its share of every global batch.

Processes are started by torchrun, by Ray Train, or by the caller; once
torch.distributed is initialized, training.train() shards each optimizer step's
micro-batches across the processes, all-reduces the gradients (NCCL on GPUs, gloo on
CPU), and only rank 0 reports progress and writes checkpoints. The global batch is
processes x micro-batch x accumulation, so a run gives the same steps as one process
accumulating that many micro-batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init_from_env() -> World:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT): NCCL when this process has a GPU, else gloo."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return world()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if world().size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum every gradient over the processes (each already divides by the global
    token count, so the sum is the global mean)."""
    if world().size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for all tensors
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
