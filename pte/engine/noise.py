"""Counter-based uniforms for the sampler: one draw per (row, step), whatever the batch shape.

A row's draws depend only on the seed, the row's index among the rows sampled together (a rank's rows of one GRPO
step) and the step, never on which rows are decoded beside it. Decoding a rank's rows in blocks of 16 or all at
once (``rollout.decode_batch``) therefore samples the same tokens, and a row leaving the batch changes no other
row's draws. The seed is one draw from the caller's generator, so a run that saves and restores that generator
(pte/training/module.py ``sampler_state``) samples exactly as before.

The hash is Chris Wellons' ``triple32`` on 32-bit words held in int64 tensors. Each multiply is split into 16-bit
halves so that no product leaves int64 (signed overflow is undefined in the C++ kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

M32 = 0xFFFFFFFF
TRIPLE32 = ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB))


def _mul32(x, c: int):
    """``x * c mod 2^32`` for ``x`` in [0, 2^32) (int or int64 tensor): every partial product stays below 2^49."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def hash32(x):
    """``triple32``: a bijection of [0, 2^32) whose output bits each flip with about half the input bits."""
    for shift, c in TRIPLE32:
        x = _mul32(x ^ (x >> shift), c)
    return x ^ (x >> 14)


@dataclass(frozen=True)
class RowNoise:
    """Independent uniform streams, one per row, for steps ``0..T-1``.

    ``keys [B]`` int64 in [0, 2^32) are distinct per row; ``counters [T, 2]`` hold each step's two hashed counters,
    built on the device, so a rollout's draws (:meth:`uniforms`) need no host-to-device copy (which would wait for
    the queued GPU work).
    """

    keys: torch.Tensor  # [B]
    counters: torch.Tensor  # [T, 2]

    @classmethod
    def draw(cls, generator: torch.Generator | None, rows: int, steps: int, device: torch.device | str) -> RowNoise:
        """Streams for rows ``0..rows-1``, seeded by one draw from ``generator`` (the global RNG when None)."""
        where = generator.device if generator is not None else "cpu"
        s0, s1 = torch.randint(0, 2**32, (2,), generator=generator, device=where).tolist()
        ids = torch.arange(rows, device=device)
        counters = hash32(torch.arange(2 * steps, device=device)).view(steps, 2)
        return cls(hash32(hash32(ids ^ s0) ^ s1), counters)

    def __getitem__(self, rows: slice | torch.Tensor) -> RowNoise:
        """The streams of ``rows`` (a block of the rows being decoded, or the rows still in the batch)."""
        return RowNoise(self.keys[rows], self.counters)

    def uniforms(self) -> torch.Tensor:
        """Every row's draws at every step, ``[B, T]`` float64 in (0, 1]: 53 random bits from two 32-bit words. One
        pass for the whole rollout costs about what one decode step's hashing did."""
        words = hash32(self.keys[:, None, None] ^ self.counters)  # [B, T, 2]
        u = ((words[..., 0] >> 5) * 2**26 + (words[..., 1] >> 6)).double() / 2**53  # [0, 1)
        return 1.0 - u
