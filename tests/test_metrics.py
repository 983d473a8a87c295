"""Tests for pte/evaluation/metrics.py: pass@k and maj@k against hand-computed values, exact cross-process merging."""

from __future__ import annotations

import math

import pytest
import torch

from pte.evaluation.metrics import MajorityAtK, PassAtK, majority_answer, pass_at_k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 0.4),
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (16, 0, 16, 0.0),
        (16, 0, 1, 0.0),
        (16, 16, 1, 1.0),
        (16, 1, 16, 1.0),
        (10, 3, 8, 1.0),  # fewer than k wrong samples: every k-subset hits a correct one
    ],
)
def test_pass_at_k_hand_values(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomials_and_survives_large_n() -> None:
    for n, c, k in [(20, 7, 5), (64, 3, 16), (30, 29, 2)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12)
    assert 0.0 < pass_at_k(2000, 1, 1000) <= 1.0


@pytest.mark.parametrize(("n", "c", "k"), [(4, 1, 5), (4, 1, 0), (4, 5, 1)])
def test_pass_at_k_rejects_invalid(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_pass_at_k_metric_means_over_problems() -> None:
    correct = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    pass1 = PassAtK(1)
    pass1.update(correct)
    assert pass1.compute().item() == pytest.approx((0.4 + 0.0 + 1.0) / 3)
    pass2 = PassAtK(2)
    pass2.update(correct)
    assert pass2.compute().item() == pytest.approx((0.7 + 0.0 + 1.0) / 3)


def test_pass_at_k_metric_rejects_too_few_samples() -> None:
    with pytest.raises(ValueError, match="k=4"):
        PassAtK(4).update(torch.ones(2, 3, dtype=torch.bool))


def _random_correct(seed: int, problems: int, n: int) -> torch.Tensor:
    return torch.rand(problems, n, generator=torch.Generator().manual_seed(seed)) < 0.3


def test_pass_at_k_merge_is_exact() -> None:
    """Two 'processes' with different problem counts merge to the single-process value, not a mean of means."""
    part_a, part_b = _random_correct(0, 7, 16), _random_correct(1, 2, 16)
    single = PassAtK(4)
    single.update(torch.cat([part_a, part_b]))
    rank0, rank1 = PassAtK(4), PassAtK(4)
    rank0.update(part_a)
    rank1.update(part_b)
    summed = (rank0.total + rank1.total) / (rank0.problems + rank1.problems)  # what an all-reduce of sums gives
    rank0.merge_state(rank1)
    assert rank0.compute().item() == pytest.approx(single.compute().item(), abs=1e-12)
    assert summed.item() == pytest.approx(single.compute().item(), abs=1e-12)
    assert rank0.compute().item() != pytest.approx((PassAtK(4)(part_a) + PassAtK(4)(part_b)).item() / 2)


def test_states_are_summed_across_processes() -> None:
    """Only sums aggregate exactly; a mean-reduced state would weight processes equally whatever their size."""
    from torchmetrics.utilities.data import dim_zero_sum

    for metric in (PassAtK(1), MajorityAtK(1)):
        assert metric._reductions and all(fn is dim_zero_sum for fn in metric._reductions.values())


def test_majority_answer_ties_go_to_first_occurrence() -> None:
    assert majority_answer(["3", "5", "5", "3"]) == 0
    assert majority_answer([None, "5", "3", "3", "5"]) == 1
    assert majority_answer(["1", "2", "2"]) == 1
    assert majority_answer([None, None]) is None


def test_majority_at_k() -> None:
    answers = [
        ["3", "5", "5", "3"],  # "5" wins in the first 3 -> sample 1, wrong
        ["7", "7", "2", "2"],  # "7" wins in the first 3 -> sample 0, wrong
        [None, None, "4", "4"],  # in the first 3 only "4" -> sample 2, correct
        [None, None, None, "1"],  # nothing in the first 3 -> unsolved
        ["9", "8", "8", "9"],  # "8" wins in the first 3 -> sample 1, correct
    ]
    correct = torch.tensor([[1, 0, 0, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1], [0, 1, 1, 0]], dtype=torch.bool)
    maj3 = MajorityAtK(3)
    maj3.update(answers, correct)
    assert maj3.compute().item() == pytest.approx(2 / 5)
    maj4 = MajorityAtK(4)
    maj4.update(answers, correct)  # ties go to the first seen: "3" right, "7" wrong, "9" wrong; "4", "1" right
    assert maj4.compute().item() == pytest.approx(3 / 5)
    maj1 = MajorityAtK(1)
    maj1.update(answers, correct)  # plain first-sample accuracy; None counts as unsolved
    assert maj1.compute().item() == pytest.approx(1 / 5)


def test_majority_merge_is_exact() -> None:
    rank0, rank1, single = MajorityAtK(2), MajorityAtK(2), MajorityAtK(2)
    answers_a, correct_a = [["1", "1"], ["2", "3"], ["4", None]], torch.tensor([[1, 1], [0, 1], [1, 0]]).bool()
    answers_b, correct_b = [["5", "6"]], torch.tensor([[1, 0]]).bool()
    rank0.update(answers_a, correct_a)
    rank1.update(answers_b, correct_b)
    single.update(answers_a + answers_b, torch.cat([correct_a, correct_b]))
    rank0.merge_state(rank1)
    assert rank0.compute().item() == single.compute().item() == pytest.approx(3 / 4)


def test_majority_validates_shapes() -> None:
    with pytest.raises(ValueError, match="answer lists"):
        MajorityAtK(1).update([["1"]], torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="need k=2"):
        MajorityAtK(2).update([["1"], ["1", "2"]], torch.ones(2, 2, dtype=torch.bool))
