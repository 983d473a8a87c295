"""``trainer.strategy: fsdp``: the frozen base sharded with FSDP2, forwards in lock-step, single-process gradients.

Two CPU processes with gloo, as in tests/test_distributed.py: forked workers for the gradient arithmetic and the
lock-step decode and replay, and train.py under Lightning's launcher for the whole loop.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import eval as eval_cli
import pte.engine.update
import pte.training.callbacks
from pte.config import METHOD_POLICY, ConfigError, load_config
from pte.engine.replay import chunk_count
from pte.engine.update import build_experience, generate_rollouts, policy_update
from pte.training.callbacks import EvalCallback
from pte.training.distributed import build_strategy, reduce_gradients, shard_frozen_base
from pte.training.lockstep import is_sharded
from pte.training.module import build_datamodule
from pte.training.sft import sft_update, teacher_forced
from tests.test_distributed import (
    AGGS,
    PROMPTS,
    REWARDS,
    TIMEOUT_S,
    TINY,
    WORLD,
    _budget_for_unequal_windows,
    _counting_backward,
    _grads,
    _model,
    _ranks_results,
    _train_ddp,
)

# W = budget - prompt length: 14 thought tokens for rank 0's prompt, 8 for rank 1's, so the ranks evict at
# different steps and replay different numbers of chunks.
OVERRIDES = ["rollout.micro_batch=2", "cache.window=0", "cache.budget=28"]
SFT_TARGETS = ["5", "1 2 3 4 5 6 7 8 9 10 11 12"]
CASES = [*(("pte", agg) for agg in AGGS), ("lora_c", "dapo")]  # LoRA's q/k/v are sharded too, PTE's are not
SKIP_REWARDS = [0.5, 0.5, 0.25, 0.75]  # rank 0's group agrees


def _cfg(method: str, agg: str):
    return load_config(TINY, [f"method={method}", f"grpo.loss_agg={agg}", *OVERRIDES])


def _any_model(cfg):
    """The test's tiny model, and for LoRA a random B (at init B = 0 and A would get no gradient)."""
    model, tok = _model(cfg)
    gen = torch.Generator().manual_seed(2)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.1
    return model, tok


def _local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()


def _fsdp_worker(rank: int, store: str, out_dir: str) -> None:
    """One rank of a sharded model: rank 0's responses end after one token, rank 1's run the whole 24."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"file://{store}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (WORLD,))
    if rank == 0:
        pte.engine.update.eos_ids = lambda tok, model: list(range(len(tok)))  # every token is an EOS here
    out = {}
    for method, agg in CASES:
        cfg = _cfg(method, agg)
        model, tok = _any_model(cfg)
        shard_frozen_base(model, mesh)
        generator = torch.Generator().manual_seed(cfg.seed + rank)
        rollouts = generate_rollouts(model, tok, [PROMPTS[rank]] * 2, cfg, METHOD_POLICY[method], generator)
        exp = build_experience(model, rollouts, torch.tensor(REWARDS[2 * rank : 2 * rank + 2]), cfg)
        backwards: list[None] = []
        policy_update(model, exp, cfg, _counting_backward(backwards))
        reduce_gradients([p for p in model.parameters() if p.requires_grad])
        frozen = [p for p in model.parameters() if not p.requires_grad]
        out[method, agg] = {
            "rollouts": rollouts,
            "grads": _grads(model),
            "backwards": len(backwards),
            "chunks": chunk_count(rollouts[0]),
            "sharded": is_sharded(model),
            "frozen_local": sum(_local_numel(p) for p in frozen),
            "frozen_full": sum(p.numel() for p in frozen),
        }
    out["eval"] = _evaluate(model, tok)
    out["sft"] = _sft_step(rank, mesh)
    out["skip"] = _skip_step(rank, mesh)
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _sft_rollouts(tok, rank: int) -> list:
    """Rank 0 is taught a 1-character answer, rank 1 a 26-character one: 1 replay chunk against several."""
    cfg = _cfg("pte", "dapo")
    return [teacher_forced(tok, [PROMPTS[rank]] * 2, [SFT_TARGETS[rank]] * 2, cfg, "pte", "cpu")]


def _sft_step(rank: int, mesh) -> dict:
    """One sharded SFT update (objective: sft), reduced like a GRPO one."""
    model, tok = _any_model(_cfg("pte", "dapo"))
    shard_frozen_base(model, mesh)
    rollouts = _sft_rollouts(tok, rank)
    backwards: list[None] = []
    sft_update(model, rollouts, _counting_backward(backwards))
    reduce_gradients([p for p in model.parameters() if p.requires_grad])
    return {"grads": _grads(model), "backwards": len(backwards), "chunks": chunk_count(rollouts[0])}


def _skip_step(rank: int, mesh) -> dict:
    """One sharded GRPO update in which rank 0's group agrees (SKIP_REWARDS): it replays no row, only idle chunks."""
    cfg = load_config(TINY, ["grpo.beta=0", "replay.skip_zero_loss=true", *OVERRIDES])
    model, tok = _any_model(cfg)
    shard_frozen_base(model, mesh)
    generator = torch.Generator().manual_seed(cfg.seed + rank)
    rollouts = generate_rollouts(model, tok, [PROMPTS[rank]] * 2, cfg, "pte", generator)
    exp = build_experience(model, rollouts, torch.tensor(SKIP_REWARDS[2 * rank : 2 * rank + 2]), cfg)
    backwards: list[None] = []
    stats = policy_update(model, exp, cfg, _counting_backward(backwards))
    reduce_gradients([p for p in model.parameters() if p.requires_grad])
    return {
        "rollouts": rollouts,
        "grads": _grads(model),
        "backwards": len(backwards),
        "replayed": stats["replayed_rows"],
        "chunks": chunk_count(rollouts[0]),
    }


def _evaluate(model, tok) -> dict:
    """The held-out evaluation on 3 prompts in batches of one: 2 batches on rank 0, 1 on rank 1 (plus one idle)."""
    cfg = load_config(TINY, ["rollout.micro_batch=1", "rollout.max_new_tokens=8"])
    dm = build_datamodule(cfg, tok)
    dm.setup()
    batches: list[int] = []
    real = pte.training.callbacks.sample_batch

    def counting(model, tok, prompts, *args):
        batches.append(len(prompts))
        return real(model, tok, prompts, *args)

    pte.training.callbacks.sample_batch = counting
    pte.training.callbacks.grade_groups = lambda grader, answers, *_: [[False] for _ in answers]
    module = SimpleNamespace(model=model, tokenizer=tok, policy_name="window", grader=SimpleNamespace())
    metrics, _ = EvalCallback(cfg, dm, every=1, limit=3).evaluate(module)
    return {"batches": batches, "metrics": metrics}


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory) -> dict:
    return _ranks_results(_fsdp_worker, tmp_path_factory.mktemp("fsdp"))


def _single_process_grads(method: str, agg: str, ranks: list[dict]) -> dict[str, torch.Tensor]:
    """The same global batch (both ranks' rollouts, in rank order) through one unsharded process."""
    cfg = _cfg(method, agg)
    model, _ = _any_model(cfg)
    rollouts = [ro for rank in ranks for ro in rank[method, agg]["rollouts"]]
    exp = build_experience(model, rollouts, torch.tensor(REWARDS), cfg)
    policy_update(model, exp, cfg, lambda loss: loss.backward())
    return _grads(model)


@pytest.mark.parametrize(("method", "agg"), CASES)
def test_fsdp_gradients_equal_single_process(fsdp_ranks, method, agg):
    """The sharded ranks' summed adapter gradients equal one process's on the same global batch (idle chunks add 0)."""
    ranks = fsdp_ranks["ranks"]
    single = _single_process_grads(method, agg, ranks)
    for rank in ranks:
        reduced = rank[method, agg]["grads"]
        assert reduced.keys() == single.keys()
        for name, grad in single.items():
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(reduced[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_fsdp_sft_gradients_equal_single_process(fsdp_ranks):
    """objective: sft pads its replay with idle chunks too; the summed gradients are one process's."""
    zero, one = (rank["sft"] for rank in fsdp_ranks["ranks"])
    assert zero["chunks"] == 1 < one["chunks"] and zero["backwards"] == one["backwards"] == one["chunks"]
    model, tok = _any_model(_cfg("pte", "dapo"))
    sft_update(model, [ro for rank in range(WORLD) for ro in _sft_rollouts(tok, rank)], lambda loss: loss.backward())
    for name, grad in _grads(model).items():
        assert grad.abs().sum() > 0, name
        for rank in (zero, one):
            torch.testing.assert_close(rank["grads"][name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_fsdp_skipped_rows_still_run_in_lockstep(fsdp_ranks):
    """replay.skip_zero_loss: rank 0 replays none of its rows (its rewards agree) but runs as many idle chunks as rank
    1 replays; the summed gradients are one process's on the global batch replayed in full."""
    zero, one = (rank["skip"] for rank in fsdp_ranks["ranks"])
    assert (zero["replayed"], one["replayed"]) == (0, 2)
    assert zero["backwards"] == one["backwards"] == one["chunks"] > 1
    cfg = load_config(TINY, ["grpo.beta=0", "replay.skip_zero_loss=false", *OVERRIDES])
    model, _ = _any_model(cfg)
    exp = build_experience(model, [zero["rollouts"][0], one["rollouts"][0]], torch.tensor(SKIP_REWARDS), cfg)
    policy_update(model, exp, cfg, lambda loss: loss.backward())
    for name, grad in _grads(model).items():
        assert grad.abs().sum() > 0, name
        for rank in (zero, one):
            torch.testing.assert_close(rank["grads"][name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_fsdp_unequal_lengths_run_in_lockstep(fsdp_ranks):
    """Rank 0 answers in one token and one chunk, rank 1 in 24 tokens and several; both finish, with as many
    backwards each (the idle chunks), and the frozen base really is split between them."""
    for case in CASES:
        zero, one = (rank[case] for rank in fsdp_ranks["ranks"])
        assert zero["rollouts"][0].response_ids.shape[1] == 1 and one["rollouts"][0].response_ids.shape[1] == 24
        assert zero["chunks"] == 1 < one["chunks"], case
        assert zero["backwards"] == one["backwards"] == one["chunks"], case
        for rank in (zero, one):
            assert rank["sharded"] and rank["frozen_local"] < 0.75 * rank["frozen_full"], case
    assert fsdp_ranks["seconds"] < TIMEOUT_S


def test_fsdp_evaluation_runs_as_many_batches_on_every_rank(fsdp_ranks):
    """Rank 1 has one held-out batch to rank 0's two, so it runs one idle batch; the records cover all 3 prompts."""
    zero, one = (rank["eval"] for rank in fsdp_ranks["ranks"])
    assert len(zero["batches"]) == len(one["batches"]) == 2
    assert zero["metrics"] == one["metrics"] and zero["metrics"]["val/accuracy"] == 0.0


def test_fsdp_strategy_and_precision_config():
    strategy = build_strategy(load_config(TINY, ["trainer.strategy=fsdp"]).trainer)
    assert type(strategy).__name__ == "ReplayFSDPStrategy"
    with pytest.raises(ConfigError, match="^trainer.precision"):
        load_config(TINY, ["trainer.strategy=fsdp", "trainer.precision=16-mixed"])


# --- the whole loop under Lightning's launcher -------------------------------------------------------------------

FSDP = ("trainer.strategy=fsdp", "trainer.devices=2", "rollout.micro_batch=1")


@pytest.mark.slow
def test_fsdp_trains_and_exports_an_adapter_eval_loads(tmp_path):
    """Two steps with held-out evaluations under FSDP: unequal windows (so unequal replay chunks), two micro-batches
    per rank, and 3 held-out prompts in batches of 1 (2 batches on rank 0, 1 on rank 1); eval.py loads the adapter.
    The global tokens are calibrated (``thought.init_move``) through the sharded base; the scales are logged."""
    budget = _budget_for_unequal_windows(load_config(TINY, list(FSDP)))
    window = ["cache.window=0", f"cache.budget={budget}"]
    evals = ["trainer.val_every=1", "trainer.val_limit=3", "thought.init_move=0.2"]
    run_dir = _train_ddp(tmp_path, "trainer.max_steps=2", *window, *evals, launch=FSDP)
    first, last = (torch.load(run_dir / "checkpoints" / f, weights_only=False) for f in ("step-1.ckpt", "last.ckpt"))
    assert first["state_dict"].keys() == last["state_dict"].keys()
    assert all(not torch.is_floating_point(v) or v.isfinite().all() for v in last["state_dict"].values())
    assert any(not torch.equal(first["state_dict"][k], v) for k, v in last["state_dict"].items())  # it trains
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/accuracy")] == [1, 2]
    scales = [acc.Scalars(f"thought/init_scale_layer{i}")[0].value for i in range(2)]
    assert all(s > 0 and abs(s - 1) > 0.01 for s in scales), scales
    results = eval_cli.main(
        [f"ckpt={run_dir / 'adapter'}", "limit=2", "policies=[pte]", "cache.window=16", "cache.budget=null"]
    )
    assert results["settings"][0]["benchmarks"]["arithmetic"]["problems"] == 2


@pytest.mark.slow
def test_fsdp_resume_is_exact(tmp_path):
    """Two steps straight equal one step, a checkpoint and one resumed step under FSDP: the same adapter weights."""
    straight = _train_ddp(tmp_path / "a", "trainer.max_steps=2", launch=FSDP)
    first = _train_ddp(tmp_path / "b", "trainer.max_steps=1", launch=FSDP)
    ckpt = first / "checkpoints" / "last.ckpt"
    _train_ddp(tmp_path / "b", "trainer.max_steps=2", f"ckpt_path={ckpt}", launch=FSDP)
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(ckpt, weights_only=False)
    assert b["global_step"] == 2 and a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
