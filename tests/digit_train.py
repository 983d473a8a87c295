"""``train.py`` with a reward a random tiny model can earn, so that subprocess tests see weights that really change.

Run as ``python tests/digit_train.py [train.py arguments]`` (the tiny model never answers arithmetic correctly, so
under the default reward every advantage, and every gradient, is zero). With ``PTE_TEST_SIGNAL=<call>:<signal>``
the reward's ``<call>``-th call sends that signal to the whole process group (as Ctrl-C in a terminal does): an
interrupt that lands in the middle of a batch, after its prompts were taken and its samples drawn.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

import pte.training.module
import train
from pte.training.rewards import CombinedReward


class DigitReward:
    """The fraction of digits in a response."""

    name = "digits"
    calls = 0

    def __call__(self, responses: list[str], golds: list[str]) -> torch.Tensor:
        DigitReward.calls += 1
        at, _, name = os.environ.get("PTE_TEST_SIGNAL", "0:").partition(":")
        if DigitReward.calls == int(at):
            os.killpg(os.getpgid(0), signal.Signals[name])
        return torch.tensor([sum(c.isdigit() for c in r) / max(len(r), 1) for r in responses])


def digit_reward(spec, grader) -> CombinedReward:
    return CombinedReward([DigitReward()], [1.0])


if __name__ == "__main__":
    pte.training.module.build_reward = digit_reward
    train.main(sys.argv[1:])
