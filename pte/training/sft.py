"""Cache-aware supervised fine-tuning (``objective: sft``): teacher forcing through the same chunked replay.

Beyond the paper, and the warm start for GRPO. A solved trace is scored exactly as a rollout of it would have
been: the same retained prompt, the same eviction points (a sampled rollout evicts at steps fixed by the prompt
length and the policy alone, so a teacher-forced one evicts at the same steps), the same thought state. The
loss is the mean next-token negative log-likelihood over response tokens, backpropagated chunk by chunk, so
every method (LoRA under the full cache, LoRA_c under the window, PTE) trains by supervision under its own cache
with activation memory bounded by the window.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from pte.config import Config, ReplayCfg
from pte.engine.cache import CachePolicy
from pte.engine.generate import encode_prompts
from pte.engine.replay import replay_all
from pte.engine.rollout import Rollout
from pte.training.distributed import all_sum


def eviction_schedule(policy: CachePolicy, prompt_mask: torch.Tensor, steps: int) -> list[int]:
    """``evict_before`` of a ``steps``-token rollout of these prompts under ``policy`` (see pte/engine/rollout.py).

    A row evicts when its thought stream crosses ``policy.evicted_before``; the stream index of the token forwarded
    at step j is its column minus the row's pads and kept (retained or sink) tokens, as in the cache.
    """
    if not policy.bounded:
        return []
    lengths = prompt_mask.sum(1).tolist()
    width = prompt_mask.shape[1]
    # pads + kept tokens; rows with the same offset evict alike (with the prompt retained, every row)
    offsets = sorted({width - n + (n if policy.retain_prompt else 0) + policy.sink_tokens for n in lengths})
    done = [0] * len(offsets)
    out = []
    for j in range(1, steps):
        due = [policy.evicted_before(width + j - 1 - off) for off in offsets]
        if due != done:
            out.append(j - 1)
            done = due
    return out


def teacher_forced(
    tok: PreTrainedTokenizerBase,
    prompts: list[str],
    targets: list[str],
    cfg: Config,
    policy_name: str,
    device,
    draw: np.random.Generator | None = None,
) -> Rollout:
    """A Rollout whose responses are ``targets`` (each followed by EOS), ready for :func:`pte.engine.replay.replay`;
    with ``draw`` its cache schedule is drawn (``cache.train_*``)."""
    ids, mask = encode_prompts(tok, prompts, chat=False, device=device)
    rows = [r + [tok.eos_token_id] for r in tok(targets, add_special_tokens=False)["input_ids"]]
    t_max = max(len(r) for r in rows)
    response = torch.full((len(rows), t_max), tok.pad_token_id, dtype=torch.long, device=device)
    response_mask = torch.zeros(len(rows), t_max, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        response[i, : len(r)] = torch.tensor(r, device=device)
        response_mask[i, : len(r)] = True
    policy = cfg.cache.policy_for(int(mask.sum(1).max()), policy_name, draw)
    return Rollout(
        prompt_ids=ids,
        prompt_mask=mask,
        response_ids=response,
        response_mask=response_mask,
        logprobs=torch.zeros(response.shape, device=device),
        truncated=torch.zeros(len(rows), dtype=torch.bool, device=device),
        policy=policy,
        temperature=1.0,
        evict_before=eviction_schedule(policy, mask, t_max),
    )


def sft_update(
    model: nn.Module,
    rollouts: list[Rollout],
    backward: Callable[[torch.Tensor], None],
    limits: ReplayCfg | None = None,
) -> dict:
    """Backpropagate the NLL of every response, summed over its tokens and averaged over sequences, chunk by chunk
    within the replay's memory bounds ``limits`` (``replay.*``).

    A sequence-level sum (not a per-token mean): the tokens that need the carried state are a few per response, and
    divided by every token their gradient falls to the size of Adam's epsilon, where PTE stops learning.

    Returns:
        Sums for logging: loss (per sequence), response tokens, entropy.
    """
    local = sum(float(ro.response_mask.sum()) for ro in rollouts)
    device = rollouts[0].response_ids.device
    rows = sum(ro.response_ids.shape[0] for ro in rollouts)
    seqs = float(all_sum(torch.tensor(rows, dtype=torch.float64, device=device)))  # global normaliser under DDP
    stats = {"loss": 0.0, "tokens": local, "entropy": 0.0}
    for i, chunk in replay_all(model, rollouts, backward, limits):
        mask = rollouts[i].response_mask[chunk.at]
        loss = -chunk.logprobs.masked_fill(~mask, 0.0).sum() / seqs  # a pad's -inf or NaN times 0 is NaN
        backward(loss)
        stats["loss"] += float(loss.detach())
        stats["entropy"] += float(chunk.entropy.masked_fill(~mask, 0.0).sum())
    return stats
