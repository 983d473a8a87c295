"""eval.py and pte.evaluation.evaluate (docs/method.md §5 protocol): sweeps, metrics, gold errors, records, reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import eval as eval_cli
import pte.evaluation.evaluate
from pte.config import as_dict, load_config
from pte.errors import UserError
from pte.evaluation.evaluate import RecordStore
from pte.evaluation.plots import Point, accuracy_vs_budget, kv_memory_curves, summarize
from pte.training.methods import build_model, export_adapter

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
FIXTURE = str(ROOT / "tests" / "fixtures" / "eval" / "math500.jsonl")  # 3 problems + 1 unparseable gold
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Small and fast: tiny model, 10 new tokens, sampled so that n_samples > 1 means something.
FAST = [
    "benchmarks=[math500]",
    f"eval.paths.math500={FIXTURE}",
    "eval.max_new_tokens=10",
    "eval.temperature=1.0",
    "reward.workers=1",
]


def _export(tmp: Path, method: str) -> Path:
    """A freshly initialised tiny adapter of ``method``, exported the way train.py does."""
    cfg = load_config(TINY, [f"method={method}"])
    model, _ = build_model(cfg)
    return export_adapter(model, cfg, tmp / f"{method}-adapter")


@pytest.fixture(scope="module")
def pte_adapter(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("ckpt"), "pte")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _count_rollouts(monkeypatch) -> list[int]:
    """Wrap the rollout used by eval so each call's row count is recorded."""
    rows: list[int] = []
    real = pte.evaluation.evaluate.rollout

    def spy(model, ids, *args, **kwargs):
        rows.append(ids.shape[0])
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(pte.evaluation.evaluate, "rollout", spy)
    return rows


def test_eval_sweep_writes_results_and_resumes(pte_adapter, tmp_path, monkeypatch):
    args = [f"ckpt={pte_adapter}", "policies=[pte]", "windows=[4,8]", "n_samples=2", "k=[1,2]", "eval.batch_size=2"]
    args += FAST
    rows = _count_rollouts(monkeypatch)
    first = eval_cli.main([*args, "limit=3"])
    out = pte_adapter / "eval"  # default: next to the checkpoint
    assert sum(rows) == 2 * 3 * 2  # settings x problems x samples
    assert len(_lines(out / "records.jsonl")) == 2 * 3
    assert [s["name"] for s in first["settings"]] == ["pte-w4", "pte-w8"]

    rows.clear()  # one more problem (the one with a broken gold): only it is generated, once per setting
    results = eval_cli.main([*args, "limit=4"])
    assert rows == [2, 2]
    records = _lines(out / "records.jsonl")
    assert len(records) == 2 * 4
    for setting in results["settings"]:
        s = setting["benchmarks"]["math500"]
        assert (s["problems"], s["gold_errors"]) == (3, 1)
        for key in ("pass@1", "pass@2", "maj@1", "maj@2", "truncated_frac"):
            assert 0.0 <= s[key] <= 1.0, key
        assert 0 < s["response_length"] <= 10 and s["tokens_per_s"] > 0 and s["kv_bytes_peak"] > 0
    w4, w8 = (r["benchmarks"]["math500"] for r in results["settings"])
    assert w4["evictions"] > w8["evictions"] and w4["kv_bytes_peak"] < w8["kv_bytes_peak"]
    broken = [r for r in records if r["gold"] == "???"]
    assert len(broken) == 2 and all(r["correct"] is None and "???" in r["gold_error"] for r in broken)

    def no_generation(*args, **kwargs):
        raise AssertionError("a finished sweep must not generate again")

    monkeypatch.setattr(pte.evaluation.evaluate, "rollout", no_generation)
    again = eval_cli.main([*args, "limit=4"])
    assert len(_lines(out / "records.jsonl")) == 2 * 4
    assert again["settings"] == results["settings"]
    assert json.loads((out / "results.json").read_text())["settings"] == results["settings"]
    table = (out / "results.md").read_text()
    assert "| pte-w4 | math500 | 3 |" in table and "| pte-w8 | math500 | 3 |" in table and "gold errors" in table
    for png in ("accuracy_math500.png", "kv_memory.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.eval.windows == [4, 8] and saved.ckpt_path == str(pte_adapter) and saved.method == "pte"


def test_changed_settings_are_not_reused(pte_adapter, tmp_path, monkeypatch):
    """A different generation length is a different fingerprint: its problems are generated, not read back."""
    args = [f"ckpt={pte_adapter}", "policies=[pte]", "limit=1", f"eval.out_dir={tmp_path}", *FAST]
    rows = _count_rollouts(monkeypatch)
    eval_cli.main(args)
    eval_cli.main([*args, "eval.max_new_tokens=6"])
    assert rows == [1, 1]
    assert len(_lines(tmp_path / "records.jsonl")) == 2


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize(("max_rows", "expected"), [(3, [2, 2, 2]), (1, [1] * 6)])
def test_max_rows_bounds_each_rollout_and_changes_no_record(
    pte_adapter, tmp_path, monkeypatch, max_rows, expected, temperature
):
    """3 problems x 2 samples (greedy or sampled) in one batch of 6 rows: at most ``eval.max_rows`` rows per rollout
    (whole problems when they fit), and every record as without the bound but the KV bytes (a smaller batch pads its
    prompts less) and, sampled, the eviction count; sampled rows draw the same tokens whatever rows they decode with."""
    args = [f"ckpt={pte_adapter}", "policies=[pte]", "windows=[4]", "n_samples=2", "eval.batch_size=3", "limit=3"]
    args += [*FAST, f"eval.temperature={temperature}"]
    rows = _count_rollouts(monkeypatch)
    eval_cli.main([*args, f"eval.out_dir={tmp_path / 'all'}"])
    assert rows == [6]
    rows.clear()
    eval_cli.main([*args, f"eval.out_dir={tmp_path / 'bounded'}", f"eval.max_rows={max_rows}"])
    assert rows == expected
    skip = {"seconds", "kv_curve", "kv_bytes_held", "kv_bytes_peak"}
    if temperature > 0:  # evictions are counted per rollout (synchronous), so samples of unequal length split them
        skip.add("evictions")
    whole, bounded = (_lines(tmp_path / d / "records.jsonl") for d in ("all", "bounded"))
    assert [{k: v for k, v in r.items() if k not in skip} for r in bounded] == [
        {k: v for k, v in r.items() if k not in skip} for r in whole
    ]


def test_base_model_eval(tmp_path, monkeypatch):
    """A base model by name, two benchmarks (one generated offline), the full cache against a window."""
    monkeypatch.chdir(tmp_path)
    args = ["model.name=tiny-qwen2", "policies=[full,window]", "windows=[4]", "limit=2", "trainer.out_dir=runs"]
    results = eval_cli.main([*args, *FAST, "benchmarks=[math500,arithmetic]"])
    out = tmp_path / "runs" / "eval-tiny-qwen2"  # default for a base model
    assert (results["method"], results["ckpt"]) == ("base", None)
    assert [s["name"] for s in results["settings"]] == ["full", "window-w4"]
    full, window = results["settings"]
    for bench in ("math500", "arithmetic"):
        assert full["benchmarks"][bench]["evictions"] == 0 and window["benchmarks"][bench]["evictions"] > 0
        assert window["benchmarks"][bench]["kv_bytes_peak"] < full["benchmarks"][bench]["kv_bytes_peak"]
    lengths = [full["benchmarks"][b]["response_length"] for b in ("math500", "arithmetic")]
    assert full["average"]["response_length"] == pytest.approx(sum(lengths) / 2)
    assert full["average"]["problems"] == 4
    assert "| full | average | 4 |" in (out / "results.md").read_text()
    for name in (
        "config.yaml",
        "results.json",
        "accuracy_math500.png",
        "accuracy_arithmetic.png",
        "accuracy_average.png",
    ):
        assert (out / name).is_file(), name


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["model=tiny-qwen2", "policies=[pte]"], "eval.policies"),
        (["model=tiny-qwen2", "n_samples=2", "k=[1,4]"], "eval.k"),
        (["model=tiny-qwen2", "benchmarks=[math5000]"], "eval.benchmarks"),
        (["model=tiny-qwen2", "windows=[-1]"], "eval.windows"),
        (["limit=2"], "ckpt"),
    ],
)
def test_bad_arguments_name_the_key(args, key, capsys):
    with pytest.raises(SystemExit) as exc:
        eval_cli.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {key}:") and err.count("\n") == 1  # one line, no traceback


def test_pte_policy_rejected_for_lora_checkpoint(tmp_path, capsys):
    lora = _export(tmp_path, "lora")
    with pytest.raises(SystemExit):
        eval_cli.main([f"ckpt={lora}", "policies=[window,pte]"])
    err = capsys.readouterr().err
    assert "eval.policies:" in err and "method=lora" in err
    assert not (lora / "eval").exists()  # rejected before anything was written


def test_lightning_checkpoint_resolves_and_loads(tmp_path):
    """A .ckpt (trainable tensors + run config, as GRPOModule saves it) gives its config, overridable per key."""
    cfg = load_config(TINY)
    model, _ = build_model(cfg)
    state = {f"model.{n}": torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"hyper_parameters": {"run_config": OmegaConf.to_container(as_dict(cfg))}, "state_dict": state}, ckpt)
    resolved, load = eval_cli.resolve(None, [f"ckpt_path={ckpt}", "cache.window=4", "n_samples=3"])
    assert (resolved.method, resolved.cache.window, resolved.eval.n_samples) == ("pte", 4, 3)
    assert pte.evaluation.evaluate.output_dir(resolved) == ckpt.parent / "eval"
    params = dict(load()[0].named_parameters())
    assert all(torch.equal(params[name.removeprefix("model.")], value) for name, value in state.items())


def _record(correct: list[bool], answers: list[str | None], gold_error: str | None = None) -> dict:
    n = len(answers)
    return {
        "correct": None if gold_error else correct,
        "gold_error": gold_error,
        "answers": answers,
        "lengths": [10] * n,
        "truncated": [False] * n,
        "window": 8,
        "evictions": 2.0,
        "kv_bytes_held": 100.0,
        "kv_bytes_peak": 120.0,
        "seconds": 1.0,
    }


def test_summarize_metrics_and_gold_errors():
    records = [
        _record([True, False, False, False], ["1", "2", "2", None]),  # pass@1 1/4, pass@2 1/2, maj@4 wrong ("2")
        _record([False, True, True, False], ["3", "4", "4", "5"]),  # pass@1 1/2, pass@2 5/6, maj@4 right ("4")
        _record([], ["x", "y", "z", "w"], gold_error="row 3: cannot parse"),
    ]
    s = summarize(records, [2, 4])
    assert (s["problems"], s["gold_errors"]) == (2, 1)
    assert s["pass@1"] == pytest.approx((1 / 4 + 1 / 2) / 2)
    assert s["pass@1_se"] == pytest.approx((((1 / 4 - 3 / 8) ** 2 + (1 / 2 - 3 / 8) ** 2) / 2 / 2) ** 0.5)
    assert s["pass@2"] == pytest.approx((1 / 2 + 5 / 6) / 2)
    assert s["pass@4"] == pytest.approx(1.0)
    assert s["maj@4"] == pytest.approx(0.5)
    assert s["maj@2"] == pytest.approx(0.5)  # first two samples: "1" wins (tie, earliest) -> right; "3" -> wrong
    assert s["tokens_per_s"] == pytest.approx(120 / 3)
    assert summarize(records[2:], [1])["pass@1"] is None  # nothing scored: no number, not zero


def test_default_sweep_of_pte_checkpoint_compares_window_and_full(pte_adapter):
    """No eval.policies: the checkpoint's own policy against both baselines, without generating anything."""
    cfg, _ = eval_cli.resolve(None, [f"ckpt={pte_adapter}", "windows=[4,8]"])
    names = [s.name for s in pte.evaluation.evaluate.sweep(cfg)]
    assert names == ["pte-w4", "pte-w8", "window-w4", "window-w8", "full"]


def test_failed_eval_keeps_the_config_of_existing_results(pte_adapter, tmp_path, capsys, monkeypatch):
    args = [f"ckpt={pte_adapter}", "policies=[pte]", "limit=1", f"eval.out_dir={tmp_path}", *FAST]
    eval_cli.main(args)
    before = {name: (tmp_path / name).read_bytes() for name in ("config.yaml", "results.json", "results.md")}

    def broken_load(*args, **kwargs):
        raise UserError("model.name: cannot load it")

    monkeypatch.setattr(eval_cli, "load_trained", broken_load)
    with pytest.raises(SystemExit) as exc:
        eval_cli.main([*args, "windows=[5]"])  # new work, so the model must load, and it fails
    assert exc.value.code == 2 and "error: model.name: cannot load it" in capsys.readouterr().err
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def test_never_evicting_setting_is_flagged(pte_adapter, tmp_path):
    """A 64-token window with 10 new tokens never evicts: the row measured the full cache and says so."""
    args = [f"ckpt={pte_adapter}", "policies=[window]", "windows=[64]", "limit=1", f"eval.out_dir={tmp_path}"]
    results = eval_cli.main([*args, *FAST])
    assert results["settings"][0]["benchmarks"]["math500"]["never_evicts"] is True
    assert "window-w64 (never evicts)" in (tmp_path / "results.md").read_text()


def test_truncated_last_record_is_dropped_once(tmp_path, caplog):
    path = tmp_path / "records.jsonl"
    good = json.dumps({"fingerprint": "f", "benchmark": "b", "id": "1"})
    path.write_text(good + "\n" + good[:10])  # the second write was cut short
    with caplog.at_level("WARNING"):
        store = RecordStore(path)
    assert store.get("f", "b", "1") is not None and "dropped 1 incomplete" in caplog.text
    assert path.read_text() == good + "\n"
    caplog.clear()
    with caplog.at_level("WARNING"):
        RecordStore(path)
    assert caplog.text == ""


def test_kv_plot_starts_at_zero_with_a_full_cache_line():
    fig = kv_memory_curves({"pte-w4": [[1, 1000.0], [5, 5000.0], [6, 4000.0], [9, 7000.0]]})
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0
    lines = {line.get_label(): line for line in ax.get_lines()}
    full = lines["full cache (extrapolated)"]
    assert list(full.get_xdata()) == [1, 9] and full.get_ydata()[-1] == pytest.approx(9000 / 2**20)


def test_accuracy_plot_has_error_bars_and_marks_never_evicting_points():
    points = {"pte": [Point(8, 0.5, 0.1), Point(64, 0.6, 0.1, never_evicts=True)], "full": [Point(None, 0.6, 0.1)]}
    ax = accuracy_vs_budget(points, "math500: n = 10 problems x 1 sample(s)").axes[0]
    assert any(type(c).__name__ == "ErrorbarContainer" for c in ax.containers)
    assert "pte: never evicted (= full cache)" in [line.get_label() for line in ax.get_lines()]
    assert ax.get_ylim()[0] == 0 and "n = 10" in ax.get_title()


def test_by_variant_scores_each_variant_in_natural_order():
    from pte.evaluation.evaluate import by_variant
    from pte.evaluation.math_sets import Problem

    problems = [Problem(str(i), "q", "1", v) for i, v in enumerate(["14x1", "6x1", "14x1", "6x2", "6x1"])]
    correct = {"0": [True], "1": [False, True], "2": [False], "3": [True], "4": [False, False]}
    records = {k: _record(c, ["1"] * len(c)) for k, c in correct.items()} | {"3": _record([], ["1"], gold_error="x")}
    table = by_variant(problems, [records[p.id] for p in problems])
    assert list(table) == ["6x1", "14x1"]  # 6x2 had only an unscored problem
    assert table["6x1"] == {"problems": 2, "pass@1": 0.25} and table["14x1"] == {"problems": 2, "pass@1": 0.5}


def test_carry_family_eval_reports_accuracy_by_variant(tmp_path, monkeypatch):
    """Over ranges of chain lengths and values, results.md breaks pass@1 down by variant, each problem counted once."""
    from pte.evaluation.math_sets import load_benchmark
    from pte.training.carry import problem_variant, variant_name

    monkeypatch.chdir(tmp_path)
    args = ["model.name=tiny-qwen2", "policies=[full]", "limit=12", "trainer.out_dir=runs", "benchmarks=[carry]"]
    results = eval_cli.main([*args, "eval.max_new_tokens=4", "data.carry_steps=[6,7]", "data.carry_values=[1,2]"])
    table = results["settings"][0]["benchmarks"]["carry"]["by_variant"]
    problems = load_benchmark("carry", limit=12, carry=([6, 7], [1, 2], 10))
    assert {p.variant for p in problems} == {variant_name(*problem_variant(p.question)) for p in problems}
    assert table == {
        v: {"problems": sum(p.variant == v for p in problems), "pass@1": 0.0} for v in ["6x1", "6x2", "7x1", "7x2"]
    }
    assert "## carry: pass@1 % by variant" in (tmp_path / "runs" / "eval-tiny-qwen2" / "results.md").read_text()
