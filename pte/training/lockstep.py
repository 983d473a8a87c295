"""Lock-step forwards for a sharded model (``trainer.strategy: fsdp``).

FSDP keeps each process's shard of the frozen base and all-gathers a module's weights inside its forward (and
again in the backward), so every process must run the same sequence of forwards and backwards or the collectives
pair up wrongly and hang. Rollouts, replays and evaluation batches run different numbers of steps per process;
these helpers decide the common count. On an unsharded model (one process, or DDP) every helper is local and
free, so the DDP path keeps its free-running processes.

Kept free of Lightning imports: pte.engine.rollout (hence pte.generate) uses it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from pte.training.collectives import all_max


def is_sharded(model: nn.Module) -> bool:
    """True when FSDP manages part of ``model``: its forwards are collectives and must run in lock-step."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


def running_anywhere(alive: torch.Tensor, sync: bool) -> bool:
    """Whether some row of ``alive`` (``[B]`` bool) is still generating, here or, with ``sync``, on any process.

    With ``sync`` a process whose rows have all finished keeps decoding (its rows emit pads, its results unchanged)
    until every process is done: one small all-reduce per check.
    """
    if not sync:
        return bool(alive.any())
    return bool(all_max(alive.any().to(torch.int32).reshape(1)))


def most_over_ranks(counts: list[int], sync: bool) -> list[int]:
    """Element-wise maximum of ``counts`` over processes with ``sync`` (else ``counts``): the lock-step counts."""
    if not sync or not counts:
        return counts
    return all_max(torch.tensor(counts, dtype=torch.int64)).tolist()
