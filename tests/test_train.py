"""train.py end to end on the tiny config, for every trainable method, plus resume from a checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import pte.training.module
import train
from pte.config import ConfigError, load_config
from pte.errors import UserError
from pte.training.checkpoints import AtomicCheckpointIO, newest_checkpoint, resolve_ckpt_path
from pte.training.methods import load_trained
from pte.training.module import NonFiniteError
from pte.training.rewards import CombinedReward
from tests import digit_train

LOGGED = {
    "train/reward_mean",
    "train/accuracy",
    "train/kl",
    "train/clip_frac",
    "train/entropy",
    "train/grad_norm",
    "train/lr",
    "train/evictions_per_seq",
    "train/window",
    "train/kv_bytes_held_per_seq",
    "train/kv_bytes_peak_per_seq",
    "train/response_length",
    "train/truncated_frac",
    "train/time_rollout_s",
    "train/tokens_per_s",
    "train/nonfinite_steps",
    "train/logp_gap_max",
    "train/logp_gap_mean",
    "train/replayed_frac",
    "memory/peak_rss_process_mib",  # CPU: the process's resident-set peak, not per phase
}


@pytest.fixture
def digit_reward(monkeypatch):
    monkeypatch.setattr(pte.training.module, "build_reward", digit_train.digit_reward)


def _train(tmp_path: Path, *overrides: str) -> Path:
    train.main(["--config", "configs/tiny.yaml", f"trainer.out_dir={tmp_path}", "trainer.run_name=run", *overrides])
    return tmp_path / "run"


def _scalars(run_dir: Path) -> set[str]:
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


@pytest.mark.parametrize("method", ["pte", "lora", "lora_c"])
def test_train_each_method(tmp_path, method, digit_reward):
    overrides = [f"method={method}", "trainer.max_steps=2"]
    run_dir = _train(tmp_path, *overrides)
    assert (run_dir / "config.yaml").read_text().count(f"method: {method}") == 1
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert LOGGED <= _scalars(run_dir)
    model, _, cfg = load_trained(run_dir / "adapter")
    assert cfg.method == method
    ckpt_model, _, _ = load_trained(run_dir / "checkpoints" / "last.ckpt")
    trained = {n: p for n, p in ckpt_model.named_parameters() if p.requires_grad}
    exported = dict(model.named_parameters())
    assert trained and all(torch.equal(p, exported[n]) for n, p in trained.items())
    name = "lr_a" if method == "pte" else "lora_B"
    assert any(name in n and p.abs().sum() > 0 for n, p in trained.items()), "training changed nothing"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rollout_replay_gap_is_logged(tmp_path, dtype):
    """train/logp_gap_max and train/logp_gap_mean every step: rounding in float32, finite and > 0 in bf16. (Every row is
    replayed: the tiny model earns no reward, so with grpo.beta 0 every row's loss would be 0 and none replayed.)"""
    over = ["trainer.max_steps=1", f"model.dtype={dtype}", "replay.skip_zero_loss=false"]
    acc = EventAccumulator(str(_train(tmp_path, *over) / "tb"))
    acc.Reload()
    gap_max, gap_mean = (acc.Scalars(f"train/logp_gap_{k}")[0].value for k in ("max", "mean"))
    assert math.isfinite(gap_max) and 0 <= gap_mean <= gap_max
    assert gap_max < 1e-4 if dtype == "float32" else 0 < gap_mean < 0.5


class HasDigit:
    """1 for a response with a digit, else 0: with groups of two, some groups agree and some do not."""

    name = "has_digit"

    def __call__(self, responses: list[str], golds: list[str]) -> torch.Tensor:
        return torch.tensor([float(any(c.isdigit() for c in r)) for r in responses])


def test_skipping_zero_loss_rows_trains_the_same_weights(tmp_path, monkeypatch):
    """grpo.beta 0: replay.skip_zero_loss replays only the groups whose rewards disagree, and the run ends at the
    weights of replaying every row (AdamW's momentum steps included, on steps where nothing is replayed)."""
    monkeypatch.setattr(pte.training.module, "build_reward", lambda spec, grader: CombinedReward([HasDigit()], [1.0]))
    over = ["trainer.max_steps=4", "rollout.temperature=1.0", "grpo.beta=0"]
    runs = {flag: _train(tmp_path / flag, *over, f"replay.skip_zero_loss={flag}") for flag in ("true", "false")}
    replayed, entropy_steps = {}, {}
    for flag, run_dir in runs.items():
        acc = EventAccumulator(str(run_dir / "tb"))
        acc.Reload()
        replayed[flag] = {e.step: e.value for e in acc.Scalars("train/replayed_frac")}
        entropy_steps[flag] = {e.step for e in acc.Scalars("train/entropy")}
    assert list(replayed["false"].values()) == [1.0] * 4
    assert len(replayed["true"]) == 4 and min(replayed["true"].values()) < 1 and max(replayed["true"].values()) > 0
    # per-replayed-token scalars are written only at steps that replayed some row
    assert entropy_steps["true"] == {s for s, frac in replayed["true"].items() if frac > 0}, replayed
    assert entropy_steps["false"] == set(replayed["false"])
    skip, full = (torch.load(runs[f] / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"] for f in runs)
    assert skip.keys() == full.keys()
    for name, weight in full.items():
        torch.testing.assert_close(skip[name], weight, atol=1e-6, rtol=1e-5, msg=name)
    assert any(weight.abs().sum() > 0 for name, weight in full.items() if name.endswith("lr_a")), "nothing trained"


def test_resume_is_exact(tmp_path, digit_reward):
    """Two steps straight equal one step, a checkpoint, and one resumed step: same weights to the last bit."""
    straight = _train(tmp_path / "a", "trainer.max_steps=2", "rollout.temperature=1.0")
    first = _train(tmp_path / "b", "trainer.max_steps=1", "rollout.temperature=1.0")
    _train(tmp_path / "b", "trainer.max_steps=2", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}")
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(first / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    one_step = torch.load(first / "checkpoints" / "last.ckpt", weights_only=False)
    assert one_step["global_step"] == 2


def test_validation_leaves_training_alone(tmp_path, digit_reward):
    """Held-out evaluations draw nothing the training draws: the same weights whether they run every step or never
    (so the toy table may evaluate less often), and train() returns the last step's train/ scalars either way."""
    runs, returned = {}, {}
    for every in (0, 1):
        over = [f"trainer.out_dir={tmp_path / str(every)}", "trainer.run_name=run", "rollout.temperature=1.0"]
        returned[every] = train.main(
            ["--config", "configs/tiny.yaml", "trainer.max_steps=3", *over, f"trainer.val_every={every}"]
        )
        runs[every] = torch.load(tmp_path / str(every) / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert "val/accuracy" in _scalars(tmp_path / "1" / "run") and "val/accuracy" not in _scalars(tmp_path / "0" / "run")
    a, b = runs[0]["state_dict"], runs[1]["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert returned[0]["train/loss"] == returned[1]["train/loss"] and "train/reward_mean" in returned[0]


def test_drawn_cache_schedules_vary_by_step_and_resume_exactly(tmp_path, digit_reward):
    """cache.train_windows / train_evict_ratios: each step draws its own schedule from the run's seed and the step, so
    a resumed run trains under the schedules an uninterrupted one would have."""
    drawn = ["cache.train_windows=[2,40]", "cache.train_evict_ratios=[0.05,0.5]", "rollout.temperature=1.0"]
    straight = _train(tmp_path / "a", "trainer.max_steps=4", *drawn)
    acc = EventAccumulator(str(straight / "tb"))
    acc.Reload()
    windows = [e.value for e in acc.Scalars("train/window")]
    assert len(windows) == 4 and len(set(windows)) > 1 and all(2 <= w <= 40 for w in windows)
    first = _train(tmp_path / "b", "trainer.max_steps=2", *drawn)
    _train(tmp_path / "b", "trainer.max_steps=4", *drawn, f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}")
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(first / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_drawn_windows_span_their_range_log_uniformly():
    import numpy as np

    cache = load_config(None, ["cache.train_windows=[8,128]", "cache.train_evict_ratios=[0.05,0.25]"]).cache
    draw = np.random.default_rng(0)
    policies = [cache.policy_for(30, "pte", draw) for _ in range(4000)]
    windows = [p.window for p in policies]
    assert min(windows) == 8 and max(windows) == 128
    below_32 = sum(w < 32 for w in windows) / len(windows)
    assert abs(below_32 - math.log(32 / 8) / math.log(129 / 8)) < 0.03  # log-uniform: as many per doubling
    assert all(0.05 <= p.evict_ratio <= 0.25 for p in policies)
    assert cache.policy_for(30, "pte").window == cache.window, "evaluation (no draw) keeps cache.window"


def test_drawn_schedules_refuse_compiled_rollouts():
    with pytest.raises(ConfigError, match="cache.train_windows"):
        load_config(None, ["cache.train_windows=[8,64]", "rollout.compile=true", "rollout.prompt_buckets=[64]"])


def test_resume_continues_step_count(tmp_path):
    run_dir = _train(tmp_path, "trainer.max_steps=1")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    first = torch.load(ckpt, weights_only=False)
    assert first["global_step"] == 1
    _train(tmp_path, "trainer.max_steps=2", f"ckpt_path={ckpt}")
    second = torch.load(ckpt, weights_only=False)
    assert second["global_step"] == 2
    assert "MathDataModule" in second, "the prompt stream position must be checkpointed"
    assert set(second["state_dict"]) == set(first["state_dict"])


def test_train_and_memory_scalars_share_the_step_axis(tmp_path):
    acc = EventAccumulator(str(_train(tmp_path, "trainer.max_steps=2") / "tb"))
    acc.Reload()
    for tag in ("train/reward_mean", "train/kv_bytes_held_per_seq", "memory/peak_rss_process_mib"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2], tag


def test_nonfinite_steps_are_skipped_then_stop_the_run_after_saving(tmp_path, monkeypatch):
    """Step 1 is finite; from then on every loss is NaN: two skipped steps (max_nonfinite=2) stop the run, and the
    step-1 state is saved (ckpt_every=0, so the failure checkpoint is the only one)."""
    real, calls = pte.training.module.policy_update, []

    def nan_after_first(*args, **kwargs):
        stats = real(*args, **kwargs)
        calls.append(1)
        return {**stats, "loss": float("nan")} if len(calls) > 1 else stats

    monkeypatch.setattr(pte.training.module, "policy_update", nan_after_first)
    with pytest.raises(NonFiniteError, match="trainer.max_nonfinite=2"):
        _train(tmp_path, "trainer.max_steps=5", "trainer.ckpt_every=0", "trainer.max_nonfinite=2")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "interrupted.ckpt", weights_only=False)
    assert (ckpt["global_step"], ckpt["pte_nonfinite_steps"], len(calls)) == (1, 2, 3)
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/nonfinite_steps")][-1] == 2
    assert math.isnan([e.value for e in acc.Scalars("train/loss")][-1])


def test_resume_refuses_a_checkpoint_of_another_adapter_shape(tmp_path):
    run_dir = _train(tmp_path, "trainer.max_steps=1")
    before = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    cfg = load_config("configs/tiny.yaml", [f"trainer.out_dir={tmp_path}", "trainer.run_name=run", "ckpt_path=last"])
    cfg.thought.rank = 8
    with pytest.raises(ConfigError, match=r"^thought.rank: checkpoint .* thought.rank=4, this run has 8$"):
        train.train(cfg)
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == before


def test_warm_start_from_an_adapter_of_another_shape_names_the_key(tmp_path, capsys):
    """A token-context export cannot start a pair-context run (W^a_K, W^a_V are twice as wide), nor an ungated one a
    gated run: the error names the key, not torch's size mismatch or a missing weight; the same shape warm-starts."""
    adapter = _train(tmp_path, "trainer.max_steps=1") / "adapter"
    with pytest.raises(SystemExit):
        _train(tmp_path / "b", "trainer.max_steps=1", f"model.adapter={adapter}", "thought.evicted_context=pair")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: thought.evicted_context: model.adapter ") and err.endswith(
        "'token', this run has 'pair'"
    )
    with pytest.raises(SystemExit):
        _train(tmp_path / "d", "trainer.max_steps=1", f"model.adapter={adapter}", "thought.write_gate=true")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: thought.write_gate: model.adapter ") and err.endswith("False, this run has True")
    _train(tmp_path / "c", "trainer.max_steps=1", f"model.adapter={adapter}")


def test_resume_refuses_a_corrupt_checkpoint_in_one_line(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"half a checkpoint")
    cfg = load_config("configs/tiny.yaml", [f"trainer.out_dir={tmp_path}", f"ckpt_path={bad}"])
    with pytest.raises(UserError, match=r"bad.ckpt cannot be read"):
        train.prepare_run_dir(cfg, tmp_path / "tiny")


def test_overwrite_replaces_an_earlier_run(tmp_path):
    run_dir = _train(tmp_path, "trainer.max_steps=2")
    cfg = load_config("configs/tiny.yaml", [f"trainer.out_dir={tmp_path}", "trainer.run_name=run"])
    with pytest.raises(ConfigError, match="^trainer.run_name: .* already holds a run"):
        train.prepare_run_dir(cfg, run_dir)
    cfg.trainer.overwrite = True
    assert train.prepare_run_dir(cfg, run_dir) is None
    assert sorted(p.name for p in run_dir.iterdir()) == []


def test_ckpt_path_last_is_the_newest_readable_checkpoint(tmp_path):
    run_dir = _train(tmp_path, "trainer.max_steps=2")
    ckpt_dir = run_dir / "checkpoints"
    (ckpt_dir / "interrupted.ckpt").write_bytes(b"truncated by a kill")
    assert newest_checkpoint(ckpt_dir) == (ckpt_dir / "last.ckpt", 2)
    assert resolve_ckpt_path("last", ckpt_dir) == ckpt_dir / "last.ckpt"
    assert resolve_ckpt_path(str(run_dir), ckpt_dir) == ckpt_dir / "last.ckpt"


def test_atomic_save_keeps_the_old_file_when_a_save_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)
    before = path.read_bytes()
    with pytest.raises(AttributeError, match="pickle"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 2, "bad": lambda: 0}, path)  # unpicklable mid-save
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_base_method_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="method=base"):
        _train(tmp_path, "method=base", "cache.policy=full")


@pytest.mark.slow
def test_pte_training_raises_a_learnable_reward(tmp_path, digit_reward):
    """Cache-aware GRPO through the chunked replay learns to emit more digits under a 16-token window.

    Measured: the mean reward goes from 0.113 over the first 10 steps to 0.147 over the last 10.
    """
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"Compute {i} + {i + 3}.", "answer": str(2 * i + 3)}) + "\n" for i in range(6))
    )
    run_dir = _train(
        tmp_path,
        "trainer.max_steps=60",
        "optim.lr=3e-2",
        "rollout.batch_size=32",
        "rollout.group_size=8",
        "rollout.micro_batch=32",
        "rollout.max_new_tokens=16",
        "grpo.beta=0.0",
        "data.source=file",
        f"data.path={data}",
        "data.val_size=2",
    )
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    rewards = [e.value for e in acc.Scalars("train/reward_mean")]
    assert len(rewards) == 60
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.02, rewards


def test_stop_at_ends_the_run_at_the_first_evaluation_reaching_it(tmp_path):
    """trainer.stop_at=0 is reached by the first evaluation (step 2 of 6): the run stops there, saved and exported."""
    run_dir = _train(tmp_path, "trainer.max_steps=6", "trainer.val_every=2", "trainer.stop_at=0.0")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert (run_dir / "adapter" / "config.yaml").exists()
    unreachable = _train(tmp_path / "b", "trainer.max_steps=4", "trainer.val_every=2", "trainer.stop_at=1.01")
    assert torch.load(unreachable / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4


@pytest.mark.parametrize("method", ["pte", "lora", "lora_c"])
def test_zero_factor_lr_scales_exactly_the_zero_initialised_factors(method):
    """optim.zero_factor_lr applies to PTE's A and LoRA's B (the factors that start at zero), and to nothing else."""
    from pte.training.methods import build_model, param_groups

    model, _ = build_model(load_config("configs/tiny.yaml", [f"method={method}"]))
    rest, zero = param_groups(model, 1e-3, 8.0)
    assert (rest["lr"], zero["lr"]) == (1e-3, 8e-3)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(rest["params"]) + len(zero["params"]) == len(trainable)
    assert zero["params"] and all(not p.any() for p in zero["params"])
    assert all(p.any() for p in rest["params"])


def test_init_move_scales_a_fresh_adapters_global_tokens_once(tmp_path, digit_reward):
    """thought.init_move rescales each layer's global tokens at the start of a fresh run (their direction kept), and a
    resumed run keeps its checkpoint's tokens: two steps straight equal one, a checkpoint and one more to the bit, even
    when the resumed run asks for another move (a calibration after the restore would rescale them)."""
    calibrated = ("thought.init_move=0.2", "rollout.temperature=1.0")
    unmoved = _train(tmp_path / "z", "trainer.max_steps=1", "optim.lr=0", *calibrated)
    fresh, _ = pte.training.module.build_model(load_config("configs/tiny.yaml", ["thought.init_move=0.2"]))
    start = {n: p for n, p in fresh.named_parameters() if n.endswith("global_tokens")}
    saved = torch.load(unmoved / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for name, tokens in start.items():
        ratio = saved[f"model.{name}"] / tokens.detach()
        assert torch.allclose(ratio, ratio.mean(), rtol=1e-4) and abs(float(ratio.mean()) - 1) > 0.01
    straight = _train(tmp_path / "a", "trainer.max_steps=2", *calibrated)
    first = _train(tmp_path / "b", "trainer.max_steps=1", *calibrated)
    _train(tmp_path / "b", "trainer.max_steps=2", "thought.init_move=0.05", f"ckpt_path={first}/checkpoints/last.ckpt")
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(first / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
