"""Log-probs and entropy of response tokens from final hidden states, through the LM head in pieces.

Notation: N scored positions (rows x tokens), d hidden size, V vocabulary, m positions per piece (``replay.logits_chunk``).

A replay chunk's full float32 logits ``[N, V]``, with their log-softmax and the entropy's copies, are the largest
tensors of the training pass at a large vocabulary (Llama-3: V = 128256, 0.5 MB per position per copy). Here the head
runs on m positions at a time, and with grad each piece is checkpointed: the forward keeps only its inputs, and the
backward rebuilds one piece's logits at a time. Each position's log-prob is the one a single head call gives.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def token_logprobs(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, piece: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``targets`` and the entropy at the sampling temperature, as the rollout scored them.

    Args:
        head: the LM head (hidden -> logits).
        hidden: ``[B, n, d]`` final hidden states (after the final norm) of the positions that predict ``targets``.
        targets: ``[B, n]`` token ids.
        temperature: the rollout's; logits are divided by it (0 = greedy, scored at temperature 1).
        piece: positions per head call (0 = all at once).

    Returns:
        Log-probs ``[B, n]`` (differentiable when grad is enabled) and entropy ``[B, n]`` (detached), float32.
    """
    b, n, d = hidden.shape
    flat, flat_targets = hidden.reshape(b * n, d), targets.reshape(b * n)  # [N, d], [N]
    size = piece if piece > 0 else max(b * n, 1)
    logps, entropies = [], []
    for s in range(0, b * n, size):
        args = (head, flat[s : s + size], flat_targets[s : s + size], temperature)
        logp, entropy = checkpoint(_piece, *args, use_reentrant=False) if torch.is_grad_enabled() else _piece(*args)
        logps.append(logp)
        entropies.append(entropy)
    if not logps:
        empty = hidden.new_zeros(b, n, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps).view(b, n), torch.cat(entropies).view(b, n)


def _piece(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[m]`` log-probs and entropies of one piece; its ``[m, V]`` tensors are freed on return."""
    logits = head(hidden).float()  # the head in the model's dtype, then float32, as the rollout's logits
    logp = torch.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)
    with torch.no_grad():
        entropy = torch.special.entr(logp.exp()).sum(-1)  # -p log p with 0 where p = 0 (a -inf logit), not NaN
    return logp.gather(-1, targets[:, None]).squeeze(-1), entropy
