"""Multi-process training through Lightning's DDP launcher, without DDP's per-backward gradient sync.

The chunked replay (docs/method.md section 4) calls backward once per chunk, and the number of chunks depends on each
rank's response lengths. DDP's reducer all-reduces on every backward, so ranks with different chunk counts would
wait on each other forever. Here the module is not wrapped for sync at all (:class:`ReplayDDPStrategy`): every
chunk's backward is local, and :func:`reduce_gradients` sums the small trainable gradients once per optimiser step.
Loss weights use batch-wide normalisers summed over ranks (:func:`all_sum`), so the summed gradient equals the
single-process gradient of the same global batch.

Every helper is the identity in a single process, so the one-device path runs unchanged. The collectives
themselves live in pte.training.collectives, which runs them on the process's communication device (NCCL: CUDA).

``trainer.strategy: fsdp`` (:class:`ReplayFSDPStrategy`) shards the frozen base with FSDP2 over the same gradient
scheme: the trainable adapter stays whole on every rank and is reduced here once per step. Sharded forwards are
collectives, so rollouts, replays and evaluation run in lock-step there (pte.training.lockstep).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies.strategy import Strategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from pte.config import TrainerCfg
from pte.engine.encoder import decoder_layers, get_thought, unwrap
from pte.engine.thought import ThoughtLinear
from pte.training.collectives import all_max, all_sum, broadcast_, gather_object, rank_world
from pte.training.lockstep import is_sharded


def reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over ranks in one all-reduce (before clipping and the optimiser step).

    A rank whose replay produced no gradient for a parameter (no response tokens) contributes zeros, so every rank
    takes part in the same single collective whatever its chunk count was; a parameter without a gradient on every
    rank keeps none, as in one process (the optimiser then skips it). The sum runs in float32.
    """
    if rank_world()[1] == 1 or not params:
        return
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
    flat = all_sum(torch.cat([*grads, has_grad]))  # [sum of numel + number of params]
    *pieces, counts = flat.split([g.numel() for g in grads] + [len(params)])
    for p, piece, count in zip(params, pieces, counts.tolist()):
        p.grad = piece.view_as(p).to(p.dtype).clone() if count > 0 else None


def global_step_totals(
    rewards: torch.Tensor,
    parts: dict[str, torch.Tensor],
    stats: dict[str, float],
    maxima: frozenset[str] = frozenset(),
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
    """A step's rewards ``[N_global]`` and reward parts over all processes (rank order), and its update statistics:
    summed over processes, except the keys in ``maxima`` (their largest value, e.g. the worst log-prob gap).

    Reward statistics (mean, std, uniform groups) and token ratios (KL, clip fraction) are then those of the global
    batch, as in a single process; the update's loss is the sum of the processes' shares.
    """
    if rank_world()[1] == 1:
        return rewards, parts, stats
    rewards_all = torch.cat([r.to(rewards.device) for r in gather_object(rewards.detach().cpu())])
    parts_all = {
        k: torch.cat([v.to(rewards.device) for v in gather_object(p.detach().cpu())]) for k, p in parts.items()
    }
    totals = {}
    for reduce, keys in ((all_sum, sorted(set(stats) - maxima)), (all_max, sorted(set(stats) & maxima))):
        if keys:
            values = reduce(torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64))
            totals.update(zip(keys, values.tolist()))
    return rewards_all, parts_all, totals


def own_share(per_rank: Any) -> Any:
    """This rank's entry of a per-rank list saved by :func:`gather_object` (a non-list is everyone's).

    Returns None when the list was saved by fewer ranks than this run has (that rank starts afresh).
    """
    if not isinstance(per_rank, list):
        return per_rank
    rank = rank_world()[0]
    return per_rank[rank] if rank < len(per_rank) else None


class ReplayDDPStrategy(DDPStrategy):
    """Lightning's DDP (launcher, process group, rank-aware logging and checkpointing) without the DDP wrapper.

    Without the wrapper no reducer hooks the parameters, so the replay's per-chunk backward calls never synchronise;
    the module reduces its trainable gradients itself (:func:`reduce_gradients`). The frozen base needs no sync: it is
    built from the same weights on every rank. The trainable parameters are broadcast from rank 0 once, so every rank
    starts from the same adapter even if initialisation drew different random numbers.
    """

    def configure_ddp(self) -> None:
        for p in self.model.parameters():
            if p.requires_grad:
                broadcast_(p.data)


def whole_parameters(model: nn.Module) -> set[nn.Parameter]:
    """What FSDP leaves whole on every rank: the trainable adapter and, for PTE, the frozen q/k/v projections.

    The adapter is small, and whole it keeps the DDP gradient scheme (local backwards, one :func:`reduce_gradients`)
    and the plain single-file checkpoints. The thought encoder applies the q/k/v projections to its global tokens
    outside the layers' forward, at evictions that fall at different steps on different ranks, so they must not
    need a collective (about 10 % of a Llama-8B's weights).
    """
    keep = {p for p in model.parameters() if p.requires_grad}
    if get_thought(model) is not None:
        for layer in decoder_layers(model):
            for name in ("q_proj", "k_proj", "v_proj"):
                proj = getattr(layer.self_attn, name)
                keep |= set((proj.base if isinstance(proj, ThoughtLinear) else proj).parameters())
    return keep


def shard_frozen_base(model: nn.Module, mesh: DeviceMesh) -> None:
    """FSDP2 (``fully_shard``) over the frozen base: one unit per decoder layer, the rest of the base (embeddings,
    final norm, LM head) the root unit; :func:`whole_parameters` stay unsharded. Idempotent."""
    if is_sharded(model):
        return
    keep = whole_parameters(model)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, ignored_params=keep)
    fully_shard(unwrap(model), mesh=mesh, ignored_params=keep)


class ReplayFSDPStrategy(ModelParallelStrategy):
    """Lightning's FSDP2 strategy (launcher, process group, device mesh) with the frozen base sharded over all ranks.

    ``GRPOModule.configure_model`` calls :func:`shard_frozen_base` on the data-parallel mesh. The trainable adapter
    is whole on every rank, so its state, checkpoints and optimiser are those of :class:`ReplayDDPStrategy`: saved
    as one file by rank 0 (trainable tensors only, no gather of the base) and broadcast from rank 0 at start.
    """

    def __init__(self) -> None:
        super().__init__(tensor_parallel_size=1, save_distributed_checkpoint=False)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # pure data parallel: shard over every rank
        super().setup_environment()

    def setup(self, trainer: L.Trainer) -> None:
        """Lightning's setup (``configure_model`` has sharded the base), then rank 0's adapter everywhere."""
        super().setup(trainer)
        for p in self.lightning_module.parameters():
            if p.requires_grad:
                broadcast_(p.data)

    @property
    def data_parallel_mesh(self) -> DeviceMesh:
        return self.device_mesh["data_parallel"]

    # The trainable state is whole and the same on every rank: checkpoints are DDP's, not FSDP's distributed ones.
    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The trainable tensors only: the frozen base is rebuilt from the config, so it is never gathered."""
        return {n: p.detach() for n, p in self.lightning_module.named_parameters() if p.requires_grad}

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        return Strategy.load_checkpoint(self, checkpoint_path, weights_only)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        Strategy.load_model_state_dict(self, checkpoint, strict)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return Strategy.optimizer_state(self, optimizer)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        Strategy.load_optimizer_state_dict(self, checkpoint)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        Strategy.save_checkpoint(self, checkpoint, filepath, storage_options)


def build_strategy(t: TrainerCfg) -> Strategy | str:
    """The Lightning strategy for ``trainer.strategy``: ``ReplayFSDPStrategy`` for fsdp, ``ReplayDDPStrategy`` for
    ddp or for auto with > 1 process."""
    if t.strategy == "fsdp":
        return ReplayFSDPStrategy()
    if t.strategy == "ddp" or t.devices != 1 or t.num_nodes > 1:
        return ReplayDDPStrategy()
    return t.strategy
