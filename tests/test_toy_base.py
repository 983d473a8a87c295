"""The toy base's lookup phase: fillers, shifted solutions, cache names, a build from a cached first phase."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from pte.models import toy
from pte.models.tiny import tiny_tokenizer
from pte.models.toy import (
    FILLER,
    ToySpec,
    lookup_batch,
    shifted_positions,
    toy_base_dir,
    with_fillers,
    with_shifted_labels,
)
from pte.training.carry import LABELS, carry_problems, problem_variant
from pte.training.rewards import verify_answer

TINY = ToySpec(
    steps=(3, 4), values=(1, 2), held_out=((4, 1),), hidden=16, layers=1, heads=2, kv_heads=1, train_steps=2,
    batch=4, eval_problems=2, lookup_steps=2, polish_rounds=0,
)  # fmt: skip
POLISHED = replace(TINY, polish_rounds=2, polish_steps=2, polish_problems=3, polish_target=1.01)  # never met


def test_fillers_go_into_question_and_solution_alike():
    rng = np.random.default_rng(0)
    seen = set()
    for p in carry_problems(200, 1, (6, 20), (1, 3)):
        f = with_fillers(p, rng, 3)
        q, s = f.question.split(" "), f.solution.split(" ")
        n = q.count(FILLER)
        seen.add(n)
        assert n == s.count(FILLER) <= 3 and f.answer == p.answer and verify_answer(f.solution, f.answer)
        assert len(s) == len(q) + 1 and all(q[i] == s[i] for i in range(len(q)) if FILLER in (q[i], s[i]))
        assert [x for x in q if x != FILLER] == p.question.split(" "), "only fillers were added"
        assert [x for x in s if x != FILLER] == p.solution.split(" ")
    assert seen == {0, 1, 2, 3}


def test_separate_fillers_keep_each_side_in_order_and_break_the_alignment():
    rng = np.random.default_rng(0)
    counts, unaligned = set(), 0
    for p in carry_problems(200, 1, (6, 20), (1, 3)):
        f = with_fillers(p, rng, 6, separate=True)
        q, s = f.question.split(" "), f.solution.split(" ")
        counts |= {q.count(FILLER), s.count(FILLER)}
        assert [x for x in q if x != FILLER] == p.question.split(" ") and max(q.count(FILLER), s.count(FILLER)) <= 6
        assert [x for x in s if x != FILLER] == p.solution.split(" ") and f.answer == p.answer
        unaligned += len(s) != len(q) + 1 or any(q[i] != s[i] for i in range(len(q)) if FILLER in (q[i], s[i]))
    assert counts == set(range(7)) and unaligned > 150


def test_the_solution_s_own_fillers_are_not_scored():
    tok = tiny_tokenizer()
    filler = tok.convert_tokens_to_ids(FILLER)
    problems = carry_problems(64, 2, (6, 20), (1, 3))
    for separate in (False, True):
        spec = replace(ToySpec(), fillers=6, separate_fillers=separate)
        ids, labels, pos = lookup_batch(spec, tok, problems, np.random.default_rng(3))
        solution = labels != -100
        assert ids.shape == labels.shape == pos.shape and solution.any(1).all()
        in_solution = (ids == filler) & (pos > torch.arange(ids.shape[1]))  # shifted, so past the prompt
        assert in_solution.any(), "some solution carries fillers"
        assert (labels[in_solution] == -100).all() == separate, "copied fillers are targets, separate ones are not"


def test_shifted_labels_start_late_on_both_sides_and_never_pass_z():
    rng = np.random.default_rng(0)
    firsts, last_letters = set(), {}
    for p in carry_problems(300, 1, (6, 20), (1, 3)):
        f = with_shifted_labels(p, rng, 6)
        steps, values = problem_variant(p.question)
        starts = set()
        for shifted, plain in ((f.question, p.question), (f.solution, p.solution)):
            items, before = shifted.split(" "), plain.split(" ")
            labels = [x[0] for x in items if x[:1].islower() and x[1:2].isdigit()]
            start = LABELS.index(labels[0])
            starts.add(start)
            assert labels == list(LABELS[start : start + steps]), "consecutive labels, one per step"
            assert [x[1:] for x in items] == [x[1:] for x in before] and items[-1] == before[-1], "only labels move"
        assert len(starts) == 1, "question and solution are shifted alike"
        assert f.answer == p.answer and verify_answer(f.solution, f.answer) and "ans" in f.solution.split(" ")
        firsts.add(start)
        last_letters.setdefault(values, set()).add(labels[-1])
    assert firsts == set(range(7)), "0 to 6 letters late"
    assert last_letters[1] >= set(LABELS[5:]), "one-value chains end at every letter from f to z"


def test_cache_names_of_the_default_and_of_the_base_before_it():
    assert ToySpec().name == "toy-carry-56b5a185-lookup-e8bd29e6-polish-8c006d1d", "a change renamed the default base"
    assert ToySpec().previous_phase().name == "toy-carry-56b5a185-lookup-e8bd29e6", "built lookup phases are reused"
    before = replace(ToySpec(), separate_fillers=False, label_shift=0, polish_rounds=0)  # copied fillers, labels from a
    assert before.name == "toy-carry-56b5a185-lookup-43d968b5", "bases built before the options keep their names"


def test_a_shifted_solution_keeps_its_prompt_positions_and_moves_as_one_block():
    labels = torch.full((64, 10), -100)
    labels[:, 6:9] = 5  # the solution: tokens 6-8, then padding
    pos = shifted_positions(labels, np.random.default_rng(0), 4)
    assert torch.equal(pos[:, :6], torch.arange(6).expand(64, 6))
    jump = pos[:, 6] - 6
    assert torch.equal(pos[:, 6:], torch.arange(6, 10) + jump[:, None]), "the solution stays contiguous"
    assert set(jump.tolist()) == {0, 1, 2, 3, 4}


def test_the_lookup_phase_has_its_own_name_after_the_first_phases():
    first = TINY.first_phase()
    assert first.lookup_steps == 0 and TINY.name.startswith(first.name + "-lookup-")
    other = replace(TINY, lookup_lr=1e-4)
    assert other.name != TINY.name and other.first_phase().name == first.name
    assert replace(first, lookup_lr=1e-4).name == first.name, "lookup settings do not rename a base without the phase"
    assert ToySpec().first_phase().name == "toy-carry-56b5a185", "the default first phase keeps its cache name"


def test_a_built_first_phase_is_reused_and_the_record_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PTE_CACHE", str(tmp_path))
    calls = []
    real = toy.train_first_phase
    monkeypatch.setattr(toy, "train_first_phase", lambda *a: calls.append(1) or real(*a))
    out = toy_base_dir(TINY)
    assert out.name == TINY.name and (tmp_path / TINY.first_phase().name / "toy_base.json").is_file()
    record = json.loads((out / "toy_base.json").read_text())
    assert record["first_phase"]["name"] == TINY.first_phase().name and record["spec"]["lookup_steps"] == 2
    assert record["train_steps_run"] == record["first_phase"]["train_steps_run"] == 2
    assert set(record["heldout_accuracy_by_steps_x_values"]) == {"3x1", "4x1", "4x2"}
    toy_base_dir(replace(TINY, lookup_lr=1e-4))  # another second phase from the same first phase
    assert len(calls) == 1, "the first phase was trained again"


def test_score_counts_each_variant_on_its_own_problems_apart_from_the_builders(monkeypatch):
    problems = toy.scoring_problems(TINY, 4)
    held_out = {p.question for ps in toy.heldout_problems(TINY).values() for p in ps}
    assert set(problems) == set(toy.combinations(TINY)) and all(len(ps) == 4 for ps in problems.values())
    assert all(problem_variant(p.question) == key for key, ps in problems.items() for p in ps)
    assert not held_out & {p.question for ps in problems.values() for p in ps}
    right = {p.question for p in problems[(3, 1)][:3]} | {problems[(4, 2)][0].question}
    monkeypatch.setattr(toy, "full_cache_correct", lambda model, tok, ps: [p.question in right for p in ps])
    assert toy.accuracy_by_variant(None, None, problems) == {"3x1": 0.75, "4x1": 0.0, "4x2": 0.25}


def test_the_cli_builds_then_scores_the_base(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PTE_CACHE", str(tmp_path))
    tiny = "--steps 3,4 --values 1,2 --held-out 4:1 --hidden 16 --layers 1 --heads 2 --kv-heads 1 --train-steps 2"
    toy.main(f"{tiny} --batch 4 --eval-problems 2 --lookup-steps 2 --polish-rounds 0 --score 3".split())
    scored = json.loads(capsys.readouterr().out)
    assert scored["base"] == TINY.name and (tmp_path / TINY.name / "toy_base.json").is_file()
    assert scored["problems_per_variant"] == 3 and set(scored["by_variant"]) == {"3x1", "4x1", "4x2"}
    assert scored["min"] == min(scored["by_variant"].values())


def test_the_polish_phase_starts_from_the_cached_lookup_phase_and_keeps_its_best_round(tmp_path, monkeypatch):
    monkeypatch.setenv("PTE_CACHE", str(tmp_path))
    out = toy_base_dir(POLISHED)
    assert out.name == TINY.name + "-polish-" + POLISHED.name.rsplit("-", 1)[1] and (tmp_path / TINY.name).is_dir()
    record = json.loads((out / "toy_base.json").read_text())
    assert record["lookup_phase"]["name"] == TINY.name and record["lookup_phase"]["first_phase"]["name"]
    polish = record["polish"]
    assert [r["steps"] for r in polish["rounds"]] == [0, 2, 4] and polish["met_target"] is False
    assert all(set(r["short"]) == {"3x1", "4x2"} for r in polish["rounds"]), "trained variants only, all short"
    best = max(range(3), key=lambda i: (polish["rounds"][i]["min"], polish["rounds"][i]["mean"]))
    assert polish["kept_after_steps"] == 2 * best
    assert set(record["heldout_accuracy_by_steps_x_values"]) == {"3x1", "4x1", "4x2"}, "held-out 4x1 scored at the end"


def test_a_build_that_meets_the_polish_target_is_saved_unchanged(monkeypatch):
    model = toy.new_model(TINY, len(tiny_tokenizer()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(toy, "accuracy_by_variant", lambda m, t, problems: {f"{s}x{v}": 1.0 for s, v in problems})
    monkeypatch.setattr(toy, "_decaying_run", lambda *a: pytest.fail("trained a build that met the target"))
    record = toy.polish_phase(replace(POLISHED, polish_target=0.96), model, tiny_tokenizer(), set())
    assert record == {"rounds": [{"steps": 0, "min": 1.0, "mean": 1.0, "short": {}}], "kept_after_steps": 0,
                      "met_target": True}  # fmt: skip
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_polish_draws_weak_variants_more_often_and_every_trained_one_sometimes():
    weights = toy.polish_weights({(3, 1): 1.0, (4, 2): 0.8, (3, 2): 0.9})
    assert weights[(4, 2)] > weights[(3, 2)] > weights[(3, 1)] > 0 and sum(weights.values()) == pytest.approx(1.0)
    assert toy.polish_weights({(3, 1): 1.0, (4, 2): 1.0}) == {(3, 1): 0.25, (4, 2): 0.25}
    checks = toy.check_problems(TINY)
    assert set(checks) == {(3, 1), (4, 2)}, "no check problem of a held-out variant"
    problems = toy.polish_problems(TINY, np.random.default_rng(0), {(3, 1): 0.0, (4, 2): 1.0}, set())
    assert problems and all(problem_variant(p.question) == (4, 2) for p in problems)
