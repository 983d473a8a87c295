"""Every collective of the codebase, on the process's communication device (training's distributed, lockstep, module).

NCCL, the backend Lightning starts for CUDA training, takes CUDA tensors only; gloo takes CPU tensors. Callers hold
their tensors wherever the step left them (rewards come back from the grader on the CPU, gradients live on the
accelerator), so each helper copies its input to :func:`comm_device`, runs the collective there and hands the result
back on the caller's device. Outside a process group every helper is local and free, so one process runs unchanged.

Kept free of Lightning imports: pte.training.lockstep, hence pte.engine.rollout and evaluation, use it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(global rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def comm_device() -> torch.device:
    """Where this process's collectives run: its current CUDA device under NCCL (Lightning sets it per rank), else the
    CPU (gloo). Only meaningful inside a process group."""
    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(value: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    """``value`` reduced over ranks: a new tensor on ``value``'s device (``value`` itself in one process)."""
    if rank_world()[1] == 1:
        return value
    out = value.detach().to(comm_device(), copy=True)
    dist.all_reduce(out, op=op)
    return out.to(value.device)


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over ranks, on ``value``'s device (``value`` itself is left alone)."""
    return _all_reduce(value, dist.ReduceOp.SUM)


def all_max(value: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``value`` over ranks, on ``value``'s device."""
    return _all_reduce(value, dist.ReduceOp.MAX)


def all_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a floating ``value`` over ranks, on ``value``'s device (a sum and a division: gloo has no average)."""
    return all_sum(value) / rank_world()[1]


def broadcast_(tensor: torch.Tensor, src: int = 0) -> None:
    """Overwrite ``tensor`` in place with rank ``src``'s values (through a copy on the communication device)."""
    if rank_world()[1] == 1:
        return
    buffer = tensor.detach().to(comm_device(), copy=True)
    dist.broadcast(buffer, src=src)
    with torch.no_grad():
        tensor.copy_(buffer)


def gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process.

    Objects travel pickled: torch puts the bytes on the backend's device itself (NCCL: the current CUDA device).
    """
    world = rank_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out
