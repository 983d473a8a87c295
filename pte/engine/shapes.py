"""Fixed decode shapes for compiled rollouts (``rollout.compile``): kept K/V storage and a compile budget.

A compiled decode step is specialised to its shapes: the rows decoded together and the cache's capacity, which it
attends in full. Rows are fixed per run (``rollout.decode_batch`` divides a rank's rows, and a compiled rollout never
drops finished rows). The capacity would follow each batch's longest prompt (prompt + window, the window itself tied
to it under the paper's rule), so it is rounded up to a prompt-length bucket (``rollout.prompt_buckets``,
pte/engine/update.py ``bucket_capacity``): one shape, hence one compilation, per bucket. The prompt's own forward runs
eagerly at the batch's real length, so no prompt is padded beyond its batch's longest. The K/V buffers are views of
storage kept on the model across rollouts, so a CUDA graph recorded for a bucket replays at the same addresses. Past
the budget of compilations, a run stops with an error rather than silently decoding eagerly (torch.compile's default
once its recompile limit is hit).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

STORE_ATTR = "_pte_kv_store"  # in the model's __dict__: neither a submodule nor saved


class KVStore:
    """Per-layer flat K/V storage that caches take contiguous ``[rows, H, slots, D]`` views of: the view of a shape has
    the same strides whatever the storage's size (a compiled step specialises on strides), and the storage grows (new
    addresses: CUDA graphs re-record) only when a rollout needs more than :meth:`reserve` said and any before."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}  # layer -> flat storage
        self.values: dict[int, torch.Tensor] = {}
        self.row_slots = 0  # rows x slots to hold at least

    def reserve(self, rows: int, slots: int) -> None:
        """Hold ``rows`` x ``slots`` from the first allocation on (the largest bucket's), so the storage never grows."""
        self.row_slots = max(self.row_slots, rows * slots)

    def views(self, layer: int, like: torch.Tensor, rows: int, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed K and V views ``[rows, H, slots, D]`` for ``layer``, in the dtype and device of ``like [*, H, *, D]``.

        Marked as static addresses: a captured graph writes them in place, so the compiler must not copy them per call.
        """
        _, h, _, d = like.shape
        shape = (rows, h, slots, d)
        n = rows * h * slots * d
        k = self.keys.get(layer)
        if k is None or k.numel() < n or k.dtype != like.dtype or k.device != like.device:
            size = max(n, self.row_slots * h * d)
            self.keys[layer], self.values[layer] = like.new_empty(size), like.new_empty(size)
        out = tuple(t[:n].view(shape).zero_() for t in (self.keys[layer], self.values[layer]))
        for t in out:
            torch._dynamo.mark_static_address(t)
        return out


def kv_store(model: nn.Module) -> KVStore:
    """The model's K/V storage for compiled rollouts, made on first use."""
    store = model.__dict__.get(STORE_ATTR)
    if store is None:
        store = model.__dict__[STORE_ATTR] = KVStore()
    return store


@contextlib.contextmanager
def compile_budget(graphs: int) -> Iterator[None]:
    """Allow each compiled function at most ``graphs`` compiled versions; one more raises instead of running eager."""
    with torch._dynamo.config.patch(recompile_limit=graphs, fail_on_recompile_limit_hit=True):
        yield
