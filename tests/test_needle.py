"""Needle in an evicted thought: PTE, trained by cache-aware SFT, recalls a token that only its evicted response held.

On the carry task (pte/training/carry.py) the worked solution writes one marked value as a capital letter (``#D``) early
in the trace and must copy it again on its answer line (``ans 9 #D3=2``). The letter appears nowhere in the prompt, and
under a 12-token window it is evicted about ten evictions before the recall. The toy base model (full-cache SFT,
pte/models/toy.py) recalls it with a full cache; frozen, with only the thought encoder (h_g, W^a, A, B) trained by the
default config's SFT (exact state-chain gradient), PTE must recall it under the window, while the plain window guesses
(1 in 10).
"""

from __future__ import annotations

import pytest
import torch

from pte.config import load_config
from pte.engine.replay import full_replay
from pte.training.carry import CODES, carry_problems
from pte.training.methods import load_trained
from pte.training.prompts import config_prompt
from pte.training.sft import teacher_forced


def _recall_index(tok, solution: str) -> int:
    """Response position of the first recalled mark letter (the capital after the answer line's first ``#``)."""
    head = solution[: solution.index("#", solution.index(" ans ")) + 1]
    return len(tok(head, add_special_tokens=False)["input_ids"])


@pytest.mark.slow
def test_pte_recalls_a_token_from_its_evicted_thoughts(tmp_path):
    from train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as make demo runs: when SFT leaves the recall plateau depends on float rounding
    try:
        train(load_config("configs/default.yaml", [f"trainer.out_dir={tmp_path}", "trainer.val_every=0"]))
    finally:
        torch.set_num_threads(threads)
    model, tok, cfg = load_trained(tmp_path / "default" / "adapter")
    problems = carry_problems(200, seed=20_000)
    prompts = [config_prompt(tok, cfg.data, p.question) for p in problems]
    recall = {}
    for policy in ("full", "pte", "window"):
        ro = teacher_forced(tok, prompts, [p.solution for p in problems], cfg, policy, "cpu")
        idx = torch.tensor([_recall_index(tok, p.solution) for p in problems])
        targets = ro.response_ids[torch.arange(len(problems)), idx]
        assert all(tok.decode(int(t)) in CODES for t in targets), "the recall position holds the mark letter"
        written = (ro.response_ids[:, : idx.min()] == targets[:, None]).float().argmax(1)  # first time written
        assert (written > 0).all(), "the letter was written earlier in the response"
        assert (written + 2 * cfg.cache.window < idx).all(), "the mark leaves the window long before its recall"
        logp = full_replay(model, ro)[torch.arange(len(problems)), idx]
        recall[policy] = float((logp > -0.693).float().mean())  # p(letter) > 1/2: the argmax for sure
    assert recall["full"] >= 0.9, recall  # the base knows the task when nothing is evicted (PTE adds nothing then)
    assert recall["pte"] >= 0.9, recall
    assert recall["window"] <= 0.3, recall
