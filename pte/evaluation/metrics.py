"""Sampling metrics for the benchmark evaluation of docs/method.md §5: pass@1 averaged over n samples, pass@16 (AIME),
and majority vote.

Both metrics are torchmetrics ``Metric`` objects whose states are plain sums (``dist_reduce_fx="sum"``), so results
from several processes aggregate exactly: the per-problem estimate is computed locally and only sums travel.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from ``n`` samples of which ``c`` are correct: 1 - C(n-c, k) / C(n, k).

    Why the product form: C(n, k) overflows floats for large n, while
    C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i) stays in [0, 1].

    Args:
        n: samples drawn for the problem.
        c: correct samples among them, 0 <= c <= n.
        k: the k of pass@k, 1 <= k <= n.

    Returns:
        The probability that at least one of k samples drawn without replacement is correct.
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def _check_correct(correct: Tensor, k: int) -> Tensor:
    """Validate a [problems, samples] correctness matrix with at least ``k`` samples and return it as bool."""
    if correct.dim() != 2:
        raise ValueError(f"correct must be [problems, samples], got shape {tuple(correct.shape)}")
    if correct.shape[1] < k:
        raise ValueError(f"k={k} needs at least k samples per problem, got {correct.shape[1]}")
    return correct.bool()


class _ProblemRate(Metric):
    """A summed numerator over a summed problem count: sums all-reduce exactly, so the rate is exact across processes."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, k: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("problems", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def compute(self) -> Tensor:
        """The rate over all problems seen (NaN before any update)."""
        if self.problems == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.total / self.problems


class PassAtK(_ProblemRate):
    """Mean over problems of the unbiased pass@k; ``PassAtK(1)`` is pass@1 averaged over the n samples."""

    def update(self, correct: Tensor) -> None:
        """Add problems.

        Args:
            correct: bool [problems, n], whether sample j of problem i was graded correct (n >= k).
        """
        correct = _check_correct(correct, self.k)
        n = correct.shape[1]
        by_count = torch.tensor([pass_at_k(n, c, self.k) for c in range(n + 1)], dtype=torch.float64)
        counts = correct.sum(dim=1).cpu()
        self.total += by_count[counts].sum().to(self.total.device)
        self.problems += correct.shape[0]


def majority_answer(answers: Sequence[str | None]) -> int | None:
    """Index of the sample carrying the most frequent non-None answer, ties going to the earliest such answer.

    Args:
        answers: extracted answer per sample (None when nothing could be extracted).

    Returns:
        Index of the first sample with the winning answer, or None when every answer is None.
    """
    votes = Counter(answer for answer in answers if answer is not None)
    if not votes:
        return None
    best = max(votes.values())
    return next(i for i, answer in enumerate(answers) if answer is not None and votes[answer] == best)


class MajorityAtK(_ProblemRate):
    """Fraction of problems whose majority answer over the first k samples is correct (maj@k)."""

    def update(self, answers: Sequence[Sequence[str | None]], correct: Tensor) -> None:
        """Add problems.

        Args:
            answers: per problem, the extracted answer string of each sample (None if none was found).
            correct: bool [problems, n], the grade of each sample; n >= k and aligned with ``answers``.
        """
        correct = _check_correct(correct, self.k)
        if len(answers) != correct.shape[0]:
            raise ValueError(f"{len(answers)} answer lists for {correct.shape[0]} problems")
        solved = 0
        for row, (sample_answers, grades) in enumerate(zip(answers, correct.tolist())):
            if len(sample_answers) < self.k:
                raise ValueError(f"problem {row}: {len(sample_answers)} answers, need k={self.k}")
            winner = majority_answer(sample_answers[: self.k])
            solved += winner is not None and grades[winner]
        self.total += solved
        self.problems += correct.shape[0]
