"""The carry task, the toy base builder and the toy-table experiment, end to end on tiny settings."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pte.experiments import toy_table
from pte.models.toy import ToySpec, train_toy_base
from pte.training.carry import BLANKS, CODES, MARKS, carry_problem, carry_problems, problem_variant
from pte.training.rewards import verify_answer


@pytest.mark.parametrize("steps,carry,letters", [(10, 1, 10), (6, 2, 2), (20, 3, 10), (26, 3, 3), (12, 2, 5)])
def test_carry_solution_is_right_and_lines_up_with_the_question(steps, carry, letters):
    p = carry_problem(np.random.default_rng(5), steps, carry, letters)
    assert problem_variant(p.question) == (steps, carry)
    tokens = p.question.split(" ")
    tokens, shape = tokens[: tokens.index("ans")], tokens[tokens.index("ans") :]
    assert shape == ["ans", "?", *[f"{b}??=?" for b in BLANKS[:carry]]], (
        "the question ends with the answer line's shape"
    )
    words = p.solution.split(" ")
    filled = words[: len(tokens)]
    blank_to_mark = str.maketrans(BLANKS, MARKS)
    assert [q[:-1].translate(blank_to_mark) if q.endswith("?") else q for q in tokens] == [
        f[:-1] if q.endswith("?") else f for q, f in zip(tokens, filled)
    ]
    start, *cells = filled
    value, marks = int(start), []
    for cell in cells:
        if cell[0] in MARKS:
            assert cell[0] == MARKS[len(marks)], "the k-th mark has the k-th symbol"
            marks.append(CODES.index(cell[1]))
            assert marks[-1] == value, "a mark copies the running value"
        else:
            value = (value + int(cell[1])) % 10
            assert cell.endswith(f"={value}")
    assert len(marks) == carry and max(marks) < letters
    ans, last, *recalls, boxed = words[len(tokens) :]
    assert (ans, int(last)) == ("ans", value)
    for k, (cell, mark) in enumerate(zip(recalls, marks, strict=True)):  # the mark's symbol and letter, digit, sum
        value = (value + mark) % 10
        assert cell == f"{MARKS[k]}{CODES[mark]}{mark}={value}"
    assert boxed == f"\\boxed{{{value}}}" and p.answer == str(value)
    assert p.answer == str((sum(marks) + int(last)) % 10) and verify_answer(p.solution, p.answer)


def test_carry_family_draws_every_variant_in_its_ranges_but_the_excluded():
    problems = carry_problems(400, seed=1, steps=[6, 9], carry=[1, 3], exclude=frozenset({(7, 2)}))
    seen = {problem_variant(p.question) for p in problems}
    assert seen == {(s, v) for s in range(6, 10) for v in range(1, min(3, s // 2) + 1)} - {(7, 2)}
    assert carry_problems(20, seed=1, steps=10, carry=1) == carry_problems(20, seed=1)


def test_carry_letters_bound_the_marked_values_and_leave_the_full_alphabet_unchanged():
    def letters_of(problems):
        return [c[1] for p in problems for c in p.solution.split(" ") if c[0] in MARKS and len(c) == 2]

    family = carry_problems(300, seed=1, steps=[6, 20], carry=[1, 3], letters=[2, 4])
    drawn = letters_of(family)
    assert set(drawn) == {"A", "B", "C", "D"} and drawn.count("A") > drawn.count("D"), "A, B lie in every alphabet"
    assert set(letters_of(carry_problems(100, seed=1, letters=2))) == {"A", "B"}
    assert set(letters_of(carry_problems(300, seed=1))) == set(CODES)
    first = carry_problems(1, seed=0, steps=[6, 20], carry=[1, 3], letters=10)[0]  # what the toy base trained on
    assert first.solution.startswith("0 a3=3 b7=0 c6=6 d8=4 #E e5=9 f5=4 $E g9=3 %D h8=1")
    assert carry_problems(50, seed=2, letters=[10, 10]) == carry_problems(50, seed=2)
    for bad in (1, 11, [3, 2], [1, 4]):
        with pytest.raises(ValueError, match="data.carry_letters"):
            carry_problems(4, seed=0, letters=bad)


def test_carry_letters_in_a_config_reach_the_data_and_a_bad_value_names_the_key(tmp_path):
    from pte.config import ConfigError, load_config
    from pte.training.module import build_datamodule

    with pytest.raises(ConfigError, match="data.carry_letters"):
        load_config("configs/default.yaml", ["data.carry_letters=1"])
    cfg = load_config(
        "configs/default.yaml", ["data.carry_letters=[2,3]", "data.size=60", "data.val_size=4", "data.template=plain"]
    )
    data = build_datamodule(cfg, None)
    data.setup("fit")
    marks = {c[1] for e in data.train_examples for c in e.solution.split(" ") if c[0] in MARKS and len(c) == 2}
    assert marks == {"A", "B", "C"}


@pytest.mark.parametrize("steps", [[0, 4], [9, 6], [1, 2, 3]])
def test_carry_ranges_are_checked(steps):
    with pytest.raises(ValueError, match="data.carry_steps"):
        carry_problems(4, seed=0, steps=steps)
    with pytest.raises(ValueError, match="data.carry_values"):
        carry_problems(4, seed=0, steps=12, carry=[1, 4])


def test_built_in_model_names_pass_the_offline_check(monkeypatch):
    from pte.models.load import check_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("toy-carry", "smollm2", "tiny-qwen2"):
        check_source(name)  # eval.py checks the name before loading: built-in names need no hub


def test_carry_problems_are_seeded_and_distinct():
    a, b = carry_problems(50, seed=3), carry_problems(50, seed=3)
    assert a == b and len({p.question for p in a}) == 50
    assert a != carry_problems(50, seed=4)


@pytest.mark.parametrize("steps,carry", [(1, 1), (10, 0), (10, 6), (27, 1)])
def test_carry_knobs_are_checked(steps, carry):
    with pytest.raises(ValueError, match="data.carry_"):
        carry_problem(np.random.default_rng(0), steps, carry)


def test_toy_base_saves_a_hub_style_directory(tmp_path):
    from pte.models.load import load_model_and_tokenizer
    from pte.models.tiny import tiny_tokenizer

    spec = ToySpec(
        steps=(3, 4), values=(1, 2), held_out=((4, 1),), hidden=32, layers=2, heads=2, kv_heads=1, train_steps=2,
        batch=4, eval_problems=3, lookup_steps=2, polish_rounds=1, polish_steps=2, polish_problems=2,
    )  # fmt: skip
    record = train_toy_base(spec, tmp_path / "toy", tiny_tokenizer())
    assert 0.0 <= record["heldout_full_cache_accuracy"] <= 1.0 and record["heldout_problems_per_combination"] == 3
    assert record["built_on"]["cpu"] and record["built_on"]["torch"] == torch.__version__
    assert set(record["heldout_accuracy_by_steps_x_values"]) == {"3x1", "4x1", "4x2"}  # the held-out 4x1 included
    model, tok = load_model_and_tokenizer(str(tmp_path / "toy"))
    assert model.config.num_hidden_layers == 2 and tok.decode(tok("3 a5=8")["input_ids"]) == "3 a5=8"
    assert json.loads((tmp_path / "toy" / "toy_base.json").read_text())["spec"]["steps"] == [3, 4]


TINY = [
    "data.source=carry",
    "data.carry_steps=3",
    "data.size=64",
    "data.instruction=''",
    "rollout.max_new_tokens=30",
    "eval.batch_size=4",
]


def test_toy_table_trains_evaluates_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "table"
    argv = [*TINY, "--config", "configs/tiny.yaml", "--out", str(out), "--steps", "2", "--seeds", "0"]
    argv += ["--problems", "4", "--windows", "8", "4", "--arms", "base", "pte_sft_grpo"]
    assert toy_table.main([*argv, "--shard", "0/2"]) == {}  # jobs (base, 0) and (pte_sft_grpo, 0): the first only
    assert (out / "base" / "seed0" / "scores.json").exists() and not (out / "pte_sft_grpo" / "seed0").exists()
    assert not (out / "results.md").exists()
    toy_table.main([*argv, "--shard", "1/2"])
    assert (out / "pte_sft_grpo" / "seed0" / "scores.json").exists()

    def fail(*args, **kwargs):
        raise AssertionError("a finished arm must not be trained or evaluated again")

    monkeypatch.setattr(toy_table, "train_arm", fail)
    table = toy_table.main(argv)
    assert set(table) == {"base", "pte_sft_grpo"}
    assert set(table["pte_sft_grpo"]) == {"W4", "W8", "full", "W4@evict0.05", "W8@evict0.15"}
    assert set(table["base"]) == {"W4", "W8", "full"}
    header = (out / "results.md").read_text().splitlines()[0]
    assert header == "| arm | W4 | W8 | full | W4@evict0.05 | W8@evict0.15 |"
    assert (out / "pte_sft_grpo" / "seed0" / "sft" / "adapter" / "pte_adapter.safetensors").exists()
    assert (out / "pte_sft_grpo" / "seed0" / "grpo" / "tb").is_dir()
    assert (out / "results.md").read_text().startswith("| arm |") and (out / "accuracy_vs_budget.png").exists()
    assert toy_table.main(argv) == table
    trained = toy_table.load_config(out / "pte_sft_grpo" / "seed0" / "sft" / "config.yaml", [])
    assert trained.rollout.max_new_tokens == 30 and trained.eval.max_new_tokens == 17 + 5 * 3 + 10 + 8


def test_claiming_lanes_skip_jobs_a_live_process_holds_and_take_over_a_dead_ones(tmp_path, monkeypatch):
    """``--claim``: the costliest arms (listed last) first; a job claimed by a live process is left to it, one claimed
    by a process that died is run; no claim is left behind, and the plain call then only tables the jobs."""
    ran: list[tuple[str, int]] = []

    def train_arm(name, arm, seed, *args):
        ran.append((name, seed))

    monkeypatch.setattr(toy_table, "train_arm", train_arm)
    monkeypatch.setattr(toy_table, "load_arm_model", lambda *args: (None, None, None))
    monkeypatch.setattr(toy_table, "evaluate_arm", lambda *args: {"W4": 0.5, "full": 1.0})
    out = tmp_path / "table"
    argv = [*TINY, "--config", "configs/tiny.yaml", "--out", str(out), "--seeds", "0", "1", "--windows", "4"]
    argv += ["--arms", "base", "pte_sft_grpo"]
    held = out / "pte_sft_grpo" / "seed0" / "claimed"
    held.parent.mkdir(parents=True)
    held.write_text(str(os.getpid()))  # a live process (this one) holds it
    assert toy_table.main([*argv, "--claim"]) == {}
    assert ran == [("pte_sft_grpo", 1), ("base", 1), ("base", 0)]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    held.write_text(str(dead.pid))
    toy_table.main([*argv, "--claim"])
    assert ran[3:] == [("pte_sft_grpo", 0)] and not list(out.rglob("claimed"))
    table = toy_table.main(argv)
    assert len(ran) == 4 and table["pte_sft_grpo"]["W4"][:1] == [50.0]
    with pytest.raises(SystemExit):
        toy_table.main([*argv, "--claim", "--shard", "0/2"])


def test_a_diverging_arm_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    from pte.training.module import NonFiniteError

    def train_arm(name, *args):  # base has nothing to train: it returns None like the real one
        if name == "pte_sft_grpo":
            raise NonFiniteError("3 consecutive steps had a non-finite loss")

    monkeypatch.setattr(toy_table, "train_arm", train_arm)
    out = tmp_path / "table"
    argv = [*TINY, "--config", "configs/tiny.yaml", "--out", str(out), "--steps", "2", "--seeds", "0"]
    table = toy_table.main([*argv, "--problems", "2", "--windows", "4", "--arms", "pte_sft_grpo", "base"])
    assert json.loads((out / "pte_sft_grpo" / "seed0" / "scores.json").read_text()) == {
        "failed": "3 consecutive steps had a non-finite loss"
    }
    assert table["pte_sft_grpo"] == {} and set(table["base"]) == {"W4", "full"}
    markdown = (out / "results.md").read_text()
    assert "| pte_sft_grpo | - | - |" in markdown and "- pte_sft_grpo seed 0: 3 consecutive steps" in markdown
    assert (out / "accuracy_vs_budget.png").exists()


def test_generation_limits_fit_the_longest_solution_unless_overridden():
    from pte.config import load_config
    from pte.training.carry import carry_problems, solution_chars

    for steps, values in ((10, 1), ((6, 20), (1, 3)), (4, (1, 3))):
        longest = max(len(p.solution) for p in carry_problems(300, 1, steps, values))
        assert longest <= solution_chars(steps, values) <= longest + 3
    cfg = load_config("configs/default.yaml", ["data.carry_steps=[6,20]", "data.carry_values=[1,3]"])
    assert toy_table.generation_limits(cfg, []) == ["rollout.max_new_tokens=155", "eval.max_new_tokens=155"]
    assert toy_table.generation_limits(cfg, ["eval.max_new_tokens=9"]) == ["rollout.max_new_tokens=155"]


def test_seed_sweep_trains_each_seed_reads_its_curve_and_counts_the_target(tmp_path, monkeypatch):
    from pte.experiments import seed_sweep

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["--config", "configs/tiny.yaml", "--out", str(tmp_path), "--seeds", "0", "1", "--lanes", "2"]
    summary = seed_sweep.main([*argv, "--target", "0.0", "trainer.val_every=1", "trainer.max_steps=2"])
    assert summary["total"] == 2 and summary["reached"] == 2  # any accuracy is >= 0
    assert all(len(summary["curves"][s]) == 2 for s in (0, 1)), "one val/accuracy per step"
    assert (tmp_path / "seed1" / "config.yaml").read_text().count("seed: 1") == 1

    def fail(*args, **kwargs):
        raise AssertionError("a finished seed must not be trained again")

    monkeypatch.setattr(seed_sweep.subprocess, "Popen", fail)
    again = seed_sweep.main([*argv, "--target", "1.01", "trainer.val_every=1", "trainer.max_steps=2"])
    assert again["reached"] == 0 and again["curves"] == summary["curves"]


def test_seed_sweep_summary_names_the_first_step_at_target():
    from pte.experiments.seed_sweep import summarise

    summary, markdown = summarise({3: [(25, 0.5), (50, 0.95), (75, 0.85)], 4: [(25, 0.1)]}, 0.9)
    assert summary["seeds"][3] == {"first_step_at_target": 50, "last_accuracy": 0.85}
    assert summary["seeds"][4]["first_step_at_target"] is None and summary["reached"] == 1
    assert "| 4 | never | 10.0 % |" in markdown and "1 of 2 seeds" in markdown


def test_toy_base_cli_reads_ranges_and_held_out_pairs():
    from pte.models.toy import _parse_pairs, _parse_range, combinations

    assert _parse_range("6,20") == (6, 20) and _parse_range("10") == (10, 10)
    assert _parse_pairs("7:2,11:3") == ((7, 2), (11, 3)) and _parse_pairs("") == ()
    spec = ToySpec(steps=(6, 7), values=(1, 3), held_out=((7, 2),))
    assert combinations(spec) == [(6, 1), (6, 2), (6, 3), (7, 1), (7, 2), (7, 3)], "held-out ones are evaluated too"


def test_toy_table_shows_a_spread_only_over_several_seeds():
    results = {"a": {"0": {"W12": 0.9}, "1": {"W12": 0.7}}, "b": {"0": {"W12": 0.5}}}
    markdown, table = toy_table.summarise(results, ["a", "b"])
    assert "| a | 80.0 ± 14.1 |" in markdown and "| b | 50.0 |" in markdown and table["b"]["W12"][2] == 1


def test_toy_table_names_the_seeds_of_an_arm_scored_on_fewer():
    results = {
        "a": {"0": {"W12": 0.9}, "1": {"W12": 0.7}},
        "b": {"2": {"W12": 0.5}},
        "c": {"0": {}, "1": {"failed": "x"}},
    }
    markdown, _ = toy_table.summarise(results, ["a", "b", "c"], seeds=(0, 1))
    assert "| a | 80.0 ± 14.1 |" in markdown and "| b (seed 2) | 50.0 |" in markdown and "| c (seed 0) |" in markdown


def test_toy_table_summarise_trains_nothing_and_tables_the_scored_jobs(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("--summarise must not train")

    monkeypatch.setattr(toy_table, "train_arm", fail)
    out = tmp_path / "table"
    for arm, seed, acc in [("base", 0, 0.1), ("pte_sft", 0, 1.0), ("pte_sft", 2, 0.8)]:
        (out / arm / f"seed{seed}").mkdir(parents=True)
        (out / arm / f"seed{seed}" / "scores.json").write_text(json.dumps({"W4": acc, "full": 1.0}))
    argv = [*TINY, "--config", "configs/tiny.yaml", "--out", str(out), "--seeds", "0", "1", "2", "--windows", "4"]
    table = toy_table.main([*argv, "--arms", "base", "pte_sft", "lora", "--summarise"])
    assert set(table) == {"base", "pte_sft"} and table["pte_sft"]["W4"][:1] == [90.0]
    markdown = (out / "results.md").read_text()
    assert "| base (seed 0) | 10.0 | 100.0 |" in markdown and "| pte_sft (seeds 0, 2) | 90.0 ± 14.1 |" in markdown
    assert (out / "accuracy_vs_budget.png").exists() and not (out / "lora").exists()
    with pytest.raises(SystemExit):
        toy_table.main([*argv, "--summarise", "--shard", "0/2"])


def test_two_stage_arms_split_the_steps_and_the_sft_only_arm_spends_them_all_on_sft():
    budget = toy_table.Budget(steps=1000, windows=(12,), problems=10, seeds=(0,))
    assert toy_table.stage_steps(toy_table.ARMS["pte_sft_grpo"], budget) == [900, 100]
    sft_only = toy_table.ABLATIONS["pte_sft"]
    assert (sft_only.method, sft_only.stages) == ("pte", ("sft",))
    assert toy_table.stage_steps(sft_only, budget) == [1000]


def test_each_ablation_changes_one_thing_in_the_recipe():
    recipe = toy_table.ARMS["pte_sft_grpo"]
    for name, arm in toy_table.ABLATIONS.items():
        if name == "pte_sft":
            continue
        assert (arm.method, arm.stages) == (recipe.method, recipe.stages), name
        keys = {o.split("=")[0] for o in arm.overrides}
        assert len(keys) == 1 or keys == {"cache.train_windows", "cache.train_evict_ratios"}, name
    assert toy_table.ABLATIONS["pte_scale_mean"].overrides == ("thought.state_scale=mean",)


def test_task_mix_arms_train_grpo_alone_on_the_letter_mix(tmp_path, monkeypatch):
    stages = []
    monkeypatch.setattr(toy_table, "run_stage", lambda config, overrides, out: stages.append((out.name, overrides)))
    budget = toy_table.Budget(steps=10, windows=(12, 24), problems=4, seeds=(0,))
    for name, method in (("pte_grpo_mix", "pte"), ("lora_c_mix", "lora_c")):
        stages.clear()
        toy_table.train_arm(name, toy_table.GRPO_ALONE[name], 0, budget, tmp_path / "c.yaml", tmp_path, ["data.size=9"])
        [(stage, overrides)] = stages
        assert stage == "grpo" and f"method={method}" in overrides and "trainer.max_steps=10" in overrides
        assert overrides[-1] == "data.carry_letters=[2,10]" and "data.size=9" in overrides


def test_binding_probe_reads_the_mark_only_beside_the_predecessor_at_layer_0(monkeypatch):
    """Layer 0's K/V of a letter are a function of the letter alone: the mark it belongs to cannot be read from them
    (no better than always guessing one mark), and it can from the row beside the mark's own (pair)."""
    from pte.experiments import binding_probe
    from tests.helpers import tiny

    monkeypatch.setattr(binding_probe, "load_model_and_tokenizer", lambda name: tiny("llama"))
    out = binding_probe.main(["--problems", "150"])
    assert {"0 k", "0 v pair", "1 k pair"} <= set(out)
    assert out["0 k pair"][0] == 1.0 and out["0 v pair"][0] == 1.0
    assert out["0 k"][0] < 0.6 and out["0 k"][1] == 1.0


def test_state_memory_shows_large_moves_forget_the_marked_letter():
    """A global-token scale whose increments rival the normalised state keeps an evicted letter for a few evictions;
    one with small moves keeps it to the recall, and so does the large scale once calibrated (``init_move``). The tiny
    model's K/V are small, so its scales are large."""
    from pte.experiments import state_memory

    def run(init_std: float, init_move: str = "null") -> dict:
        args = [f"thought.init_std={init_std}", f"thought.init_move={init_move}"]
        return state_memory.main(["--problems", "40", "model.name=tiny-llama", *args])

    small, large, calibrated = run(10.0), run(300.0), run(300.0, "0.1")
    assert max(small["moves"]) < 0.1 and min(large["moves"]) > 0.5 and max(calibrated["moves"]) < 0.2
    for kept, forgot, near_s, near_l in zip(small["recall"], large["recall"], small["memory"][10], large["memory"][10]):
        assert kept > 0.5 * near_s and forgot < 0.05 * near_l
    assert all(c > 10 * f for c, f in zip(calibrated["recall"], large["recall"]))  # init_move undoes the large scale


def test_family_runs_every_stage_of_a_seed_scores_it_and_keeps_what_is_finished(tmp_path, monkeypatch):
    from pte.experiments import family

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = [
        "--config",
        "configs/tiny.yaml",
        "--base-config",
        "configs/tiny.yaml",
        "--out",
        str(tmp_path),
        "--seeds",
        "0",
    ]
    argv += ["--first-values", "1", "1", "--all-steps", "2", "--problems", "4", "--windows", "4", "--free-window", "64"]
    argv += [
        "--eval-overrides",
        "eval.benchmarks=[carry]",
        "eval.max_new_tokens=30",
        "--",
        *TINY,
        "trainer.max_steps=2",
        "data.carry_steps=[3,4]",  # two variants: scores are read per variant
    ]
    summary = family.main(argv)
    assert list(summary["by_values"]) == ["pte-w4", "pte-w64", "full", "evict0.05 pte-w4"]
    assert set(summary["by_values"]["full"]) == {"1", "all"} and len(summary["by_values"]["full"]["all"]) == 1
    every = family.load_config(tmp_path / "seed0" / "all" / "config.yaml")
    assert every.trainer.max_steps == 2 and every.model.adapter == str(tmp_path / "seed0" / "first" / "adapter")
    assert family.load_config(tmp_path / "seed0" / "demo" / "config.yaml").trainer.stop_at == 0.95

    def fail(*args, **kwargs):
        raise AssertionError("a finished stage must not run again")

    monkeypatch.setattr(family.subprocess, "run", fail)
    assert family.main(argv)["by_values"] == summary["by_values"]


def test_family_resumes_a_cut_off_stage_and_keys_the_demo_stage_to_the_family_structure(tmp_path):
    from pte.experiments import family

    args = argparse.Namespace(
        out=tmp_path, config=Path("configs/carry_family.yaml"), base_config=Path("configs/default.yaml"),
        first_values=[2, 3], demo_stop=0.95, all_steps=2500, problems=9, windows=[12], free_window=200,
        overrides=[], eval_overrides=[],
    )  # fmt: skip
    (tmp_path / "seed3" / "first" / "checkpoints").mkdir(parents=True)
    (tmp_path / "seed3" / "first" / "checkpoints" / "step-10.ckpt").touch()
    (demo, _, demo_cmd), (_, _, first_cmd), (_, _, all_cmd), *evals = family.seed_jobs(args, 3)
    assert demo == tmp_path / "seed3" / "demo" and "trainer.overwrite=true" in demo_cmd
    assert {"thought.evicted_context=pair", "thought.write_gate=true", "seed=3"} <= set(demo_cmd)
    assert "ckpt_path=last" in first_cmd and "data.carry_values=[2,3]" in first_cmd
    assert f"model.adapter={tmp_path / 'seed3' / 'first' / 'adapter'}" in all_cmd
    assert [e[2][-1] for e in evals] == [f"eval.out_dir={tmp_path / 'seed3' / n}" for n in ("eval", "eval_r05")]


def test_family_summary_weights_variants_by_problems_and_lists_the_cells_below_target():
    from pte.experiments.family import summarise

    per_seed = {
        0: {"pte-w12": {"6x1": (100.0, 3), "6x2": (50.0, 1)}, "full": {"6x1": (0.0, 3), "6x2": (100.0, 1)}},
        1: {"pte-w12": {"6x1": (100.0, 1), "6x2": (100.0, 1)}, "full": {"6x1": (100.0, 1), "6x2": (100.0, 1)}},
    }
    summary, markdown = summarise(per_seed, 0.85)
    assert summary["by_values"]["pte-w12"] == {"1": [100.0, 100.0], "2": [50.0, 100.0], "all": [87.5, 100.0]}
    assert summary["below_target"] == [(0, "pte-w12", "6x2", 50.0, 1)]  # the full cache is the base's, not scored
    assert "| pte-w12 | 100.0 ± 0.0 | 75.0 ± 35.4 | 93.8 ± 8.8 | 6x2 50, 6x1 100 |" in markdown
