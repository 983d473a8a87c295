"""The sampler's per-row uniform streams: exact 32-bit arithmetic, uniform draws, and independence of the batch."""

from __future__ import annotations

import torch

from pte.engine.noise import M32, TRIPLE32, RowNoise, hash32


def reference_hash32(x: int) -> int:
    """``triple32`` with Python's unbounded ints, reduced mod 2^32 after each multiply."""
    for shift, c in TRIPLE32:
        x = ((x ^ (x >> shift)) * c) & M32
    return x ^ (x >> 14)


def test_hash_matches_unbounded_arithmetic_and_is_a_bijection():
    xs = torch.randint(0, 2**32, (4096,), generator=torch.Generator().manual_seed(0))
    assert hash32(xs).tolist() == [reference_hash32(x) for x in xs.tolist()]
    assert hash32(torch.tensor([M32])).item() == reference_hash32(M32)
    assert hash32(torch.arange(1 << 16)).unique().numel() == 1 << 16


def test_uniforms_are_uniform_in_the_half_open_unit_interval():
    noise = RowNoise.draw(torch.Generator().manual_seed(0), 20000, 8, "cpu")
    u = noise.uniforms().T  # [steps, rows]
    assert u.dtype == torch.float64 and (u > 0).all() and (u <= 1).all()
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    assert (counts - u.numel() / 10).abs().max() < 0.03 * u.numel() / 10
    assert abs(float(torch.corrcoef(u[:2])[0, 1])) < 0.03, "successive steps of a row are uncorrelated"


def test_a_rows_draws_do_not_depend_on_the_other_rows():
    """Any block of rows, or the rows left after others finished, draws what it draws in the whole batch."""
    noise = RowNoise.draw(torch.Generator().manual_seed(3), 64, 16, "cpu")
    left = torch.tensor([2, 17, 40])
    whole = noise.uniforms()  # [rows, steps]
    assert torch.equal(noise[16:32].uniforms(), whole[16:32])
    assert torch.equal(noise[left].uniforms(), whole[left])
    assert whole[:, 0].unique().numel() == 64


def test_one_draw_from_the_generator_whatever_the_rows():
    """The seed costs the caller's generator the same draws for any batch, so a restored sampler state repeats a
    step's samples exactly (pte/training/module.py sampler_state)."""
    gens = [torch.Generator().manual_seed(9) for _ in range(2)]
    first = RowNoise.draw(gens[0], 4, 8, "cpu")
    wide = RowNoise.draw(gens[1], 64, 8, "cpu")
    assert torch.equal(gens[0].get_state(), gens[1].get_state())
    assert torch.equal(first.uniforms(), wide[:4].uniforms())
    assert not torch.equal(RowNoise.draw(gens[0], 4, 8, "cpu").uniforms(), first.uniforms()), "a new seed per draw"
