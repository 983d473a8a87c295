"""The performance suite and the engine pieces it measures: FLOP count, CLI (the eviction schedule the suite's
synthetic rollouts use, pte.training.sft.eviction_schedule, is tested against real rollouts in test_chain.py)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn

from pte.bench import common, decode, rollout_memory, train_memory
from pte.bench.__main__ import BENCHMARKS, build_parser, main
from pte.bench.plot import SPECS
from pte.config import load_config
from pte.engine.cache import CachePolicy
from pte.engine.rollout import attn_flops_per_key
from tests.helpers import PROMPTS, run, tiny, tiny_pte


def test_attn_flops_count_full_cache_in_closed_form():
    model, tok = tiny()
    ro = run(model, tok, ["Count: 1 2 3"], CachePolicy("full"), 20)
    p = ro.prompt_ids.shape[1]
    keys = p * (p + 1) / 2 + sum(p + j for j in range(1, 20))  # prefill, then token j attends P + j slots
    assert attn_flops_per_key(model) == 4 * 4 * 16 * 2  # heads x head_dim x layers of the tiny model
    assert ro.attn_flops() == keys * attn_flops_per_key(model)
    assert ro.stats()["attn_tflops"] == ro.attn_flops() / 1e12


def test_bounded_policies_attend_fewer_keys():
    model, tok = tiny_pte(random_a=False)
    full, window = (run(model, tok, PROMPTS, CachePolicy(k, window=8), 40) for k in ("full", "pte"))
    assert window.attn_flops() < 0.9 * full.attn_flops()  # prompts of ~40 tokens, window 8, 40 new tokens


def test_rollout_memory_child_reports_flat_kv_under_window():
    setting = {"model": "tiny-llama", "dtype": "float32", "policy": "window", "batch": 2, "window": 8}
    setting |= {"prompt_len": 8}
    short, long = (rollout_memory.child({**setting, "length": n}) for n in (32, 96))
    assert short["kv_bytes_peak"] == long["kv_bytes_peak"] > 0
    assert long["peak_bytes"] > 0


def test_train_memory_child_runs_both_methods():
    setting = {"model": "tiny-llama", "dtype": "float32", "batch": 1, "window": 8, "prompt_len": 8, "length": 40}
    pte, lora = (train_memory.child({**setting, "method": m}) for m in ("pte", "lora"))
    assert pte["chunks"] > 3 and pte["peak_bytes"] > 0 and lora["peak_bytes"] > 0


def test_cli_writes_json(tmp_path):
    out = tmp_path / "flops.json"
    main(
        ["flops", "--model", "tiny-llama", "--lengths", "24", "--window", "8", "--prompt-len", "8", "--json", str(out)]
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["policy"] for r in rows] == ["full", "window", "pte"]
    assert rows[1]["vs_full"] == pytest.approx(rows[1]["attn_tflops"] / rows[0]["attn_tflops"])
    assert rows[1]["vs_full"] < 1.0


def test_decode_reports_ratios_against_generate(tmp_path):
    out = tmp_path / "decode.json"
    args = ["decode", "--model", "tiny-llama", "--lengths", "12", "--batch", "2", "--repeats", "1", "--window", "8"]
    main([*args, "--methods", "generate", "generate-static", "window", "--prompt-len", "8", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["generate", "generate-static", "window"]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    # each ratio compares two different runs (the reference row's own ratio is 1 by construction, so not checked)
    seconds = [r["seconds"] for r in rows]
    assert [r["vs_generate"] for r in rows[1:]] == pytest.approx([seconds[0] / t for t in seconds[1:]])
    assert [r["window_time_ratio"] for r in rows[:2]] == pytest.approx([t / seconds[2] for t in seconds[:2]])
    assert rows[2]["ms_per_step"] == pytest.approx(1e3 * rows[2]["seconds"] / 12)


def test_rollout_throughput_decodes_the_same_tokens_both_ways(tmp_path):
    """Micro-batches one after another and all rows at once sample the same tokens from the same streams; the
    micro-batches forward every row's prompt, the decode batch one per group."""
    out = tmp_path / "rt.json"
    args = ["rollout-throughput", "--model", "tiny-llama", "--rows", "8", "--micro-batch", "4", "--group", "4"]
    main([*args, "--tokens", "12", "--window", "8", "--prompt-len", "8", "--json", str(out)])
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["rows"]] == ["micro-batches", "decode-batch"]
    assert result["same_tokens_12"] and result["max_logprob_diff_12"] < 1e-4
    micro, batch = result["rows"]
    assert result["speedup_12"] == batch["speedup"] == pytest.approx(micro["seconds"] / batch["seconds"])
    assert len(result["conditions"]["load_average"]) == 3


def test_step_time_replays_every_row_and_the_skipped_rows(tmp_path):
    """The tiny model earns no arithmetic reward, so every group agrees: the skipping replay runs no row. The rollout
    is timed in inference mode and under no_grad."""
    out = tmp_path / "step.json"
    args = ["step-time", "--model", "tiny-llama", "--methods", "pte", "--steps", "2", "--json", str(out)]
    main([*args, "rollout.batch_size=4", "rollout.group_size=2", "rollout.micro_batch=4", "rollout.max_new_tokens=12"])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["replayed_frac"] == 0 and row["replay_backward"] > 0 and row["replay_skip"] >= 0
    assert row["same_tokens"] == 1 and row["rollout_no_grad"] > 0  # inference mode samples what no_grad does
    assert row["total"] == pytest.approx(sum(row[k] for k in ("rollout", "reward", "replay_backward", "optimizer")))


def test_linears_only_floor_runs_every_linear_layer_once_per_step():
    model, _ = tiny()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    seen: list[tuple[int, ...]] = []
    for m in linears:
        m.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    decode._linears_only(model, batch=3, n=5)()
    assert model.lm_head in linears and len(linears) > 7
    assert len(seen) == 5 * len(linears) and set(seen) == {(3, m.in_features) for m in linears}


GPU_SH = Path(__file__).parents[1] / "scripts" / "gpu.sh"
# gpu.sh's values at CPU size: a random tiny model, short rollouts, one repeat, a small batch and window.
TINY_VALUES = {"--model": "tiny-llama", "--batch": "2", "--repeats": "1", "--warmup": "4", "--window": "8"}
TINY_VALUES |= {"--rows": "8", "--micro-batch": "4", "--group": "4", "--tokens": "16", "--prompt-len": "8"}
TINY_OVERRIDES = {"rollout.max_new_tokens": "16", "cache.window": "8"}


def _bench_invocations(script: Path) -> list[tuple[int, list[str]]]:
    """``(time limit, argv)`` of every ``run SECONDS NAME JSON ARGS...`` line of a scripts/*.sh script."""
    text = script.read_text().replace("\\\n", " ")
    calls = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["run"] and words[1].isdigit():
            limit, name, _json, *args = words[1:]
            calls.append((int(limit), [name, *args]))
    return calls


def _tiny(argv: list[str]) -> list[str]:
    """``argv`` at CPU size: each value in TINY_VALUES / TINY_OVERRIDES shrunk, ``--lengths`` cut to 16, 24, ...
    tokens, a window and prompt short enough to evict; every other flag (``--dtype``, ``--methods``) as written."""
    out, flag, n_lengths = [], None, 0
    for word in argv:
        key, eq, _ = word.partition("=")
        if word.startswith("--"):
            flag = word
            out.append(word)
        elif eq and key in TINY_OVERRIDES:
            out.append(f"{key}={TINY_OVERRIDES[key]}")
        elif flag == "--lengths" and not eq:
            out.append(str(16 + 8 * n_lengths))
            n_lengths += 1
        else:
            out.append(TINY_VALUES.get(flag, word) if not eq else word)
    takes = vars(build_parser().parse_args(out))
    for f in ("--window", "--prompt-len"):
        if f[2:].replace("-", "_") in takes and f not in out:
            out += [f, "8"]
    return out


def test_gpu_script_parses_within_its_budget():
    """make bench-gpu runs only on a lent GPU: its lines must name every benchmark, keep the 8-minute budget,
    and pass each benchmark's parser (a typo fails here, not in the GPU's minutes)."""
    calls = _bench_invocations(GPU_SH)
    names = {"decode", "rollout-throughput", "rollout-memory", "train-memory", "flops", "step-time"}
    assert {argv[0] for _, argv in calls} == names
    assert sum(limit for limit, _ in calls) <= 8 * 60
    assert '-m pte.bench "$name" --json "$OUT/$json.json" --plot "$OUT/$json.png" "$@"' in GPU_SH.read_text()
    for _, argv in calls:
        args = build_parser().parse_args(argv)
        if hasattr(args, "dtype"):
            assert isinstance(getattr(torch, args.dtype), torch.dtype), argv
        if args.name == "step-time":
            load_config(None, [f"model.name={args.model}", *args.overrides])


@pytest.mark.parametrize("argv", [a for _, a in _bench_invocations(GPU_SH)], ids=lambda a: a[0])
def test_gpu_script_line_runs_at_tiny_size(argv, tmp_path, monkeypatch):
    """Each line of gpu.sh, shrunk to a tiny model, runs on CPU with its own flags (bfloat16 included) and writes
    its JSON and plot; the benchmarks' per-setting child processes run in this process to save the start-ups."""
    monkeypatch.setattr(common, "in_child", lambda bench, setting: BENCHMARKS[bench].child(setting))
    tiny_argv = _tiny(argv)
    flags = [w for w in argv if w.startswith("--")]
    assert [w for w in tiny_argv if w.startswith("--")][: len(flags)] == flags  # only a window / prompt appended
    out = tmp_path / "result"
    main([*tiny_argv, "--json", f"{out}.json", "--plot", f"{out}.png"])
    assert json.loads(out.with_suffix(".json").read_text())["rows"]
    assert out.with_suffix(".png").exists() == (argv[0] in SPECS)  # step-time has no length axis to plot
