"""Multi-process training (pte.training.distributed): sharded prompts, one gradient reduction per step, no hang.

The two-process checks run on CPU with gloo: workers under torch.multiprocessing for the gradient arithmetic, and
train.py under Lightning's own launcher for the whole loop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import pte.training.callbacks
import pte.training.data
from pte.config import ConfigError, load_config
from pte.engine.generate import encode_prompts
from pte.engine.update import build_experience, generate_rollouts, policy_update
from pte.models.tiny import tiny_tokenizer
from pte.training.callbacks import EvalCallback
from pte.training.distributed import build_strategy, reduce_gradients
from pte.training.methods import build_model
from pte.training.module import build_datamodule

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
PROMPTS = ["What is 2 + 3?", "Count: 1 2 3 4 5 6 7"]  # one prompt (a group of 2) per rank
REWARDS = [1.0, 0.0, 0.25, 0.75]  # fixed, so both runs see the same advantages
MAX_NEW = (3, 24)  # per rank: rank 0 replays 1 chunk, rank 1 several (window 16, evicting 4 at a time)
AGGS = ("grpo", "dapo", "dr_grpo")
WORLD = 2
TIMEOUT_S = 240


def _cfg(agg: str):
    return load_config(TINY, [f"grpo.loss_agg={agg}", "rollout.micro_batch=2"])


def _model(cfg):
    """The tiny PTE model with a random A (at init A = 0 and B would get no gradient), the same in every process."""
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if name.endswith("lr_a"):
            p.data = torch.randn(p.shape, generator=gen) * 0.1
    return model, tok


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _counting_backward(calls: list):
    def backward(loss: torch.Tensor) -> None:
        calls.append(loss.backward())

    return backward


def _worker(rank: int, store: str, out_dir: str) -> None:
    """One rank: sample its group with seed + rank, replay it chunk by chunk, reduce once; save what it did."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"file://{store}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    out = {}
    for agg in AGGS:
        cfg = _cfg(agg)
        model, tok = _model(cfg)
        sample_cfg = replace(cfg, rollout=replace(cfg.rollout, max_new_tokens=MAX_NEW[rank]))
        generator = torch.Generator().manual_seed(cfg.seed + rank)
        rollouts = generate_rollouts(model, tok, [PROMPTS[rank]] * 2, sample_cfg, "pte", generator)
        rewards = torch.tensor(REWARDS[2 * rank : 2 * rank + 2])
        exp = build_experience(model, rollouts, rewards, cfg)
        backwards: list[None] = []
        policy_update(model, exp, cfg, _counting_backward(backwards))
        reduce_gradients([p for p in model.parameters() if p.requires_grad])
        out[agg] = {"rollouts": rollouts, "grads": _grads(model), "backwards": len(backwards)}
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _run_ranks(worker, tmp: Path) -> float:
    """Run ``worker(rank, store, out_dir)`` on WORLD forked processes with a deadline; return the seconds taken.

    A rank waiting on a collective the other never joins fails the test instead of hanging it. Forked, so nothing
    is re-imported (~2 s instead of ~35 s spawned); the suite runs torch single-threaded (conftest), and each worker
    opens its own process group.
    """
    start = time.monotonic()
    ctx = mp.start_processes(worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=False, start_method="fork")
    while not ctx.join(timeout=1):
        if time.monotonic() - start > TIMEOUT_S:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"two-process run still going after {TIMEOUT_S} s (hang)")
    return time.monotonic() - start


def _ranks_results(worker, tmp) -> dict:
    """Run ``worker`` on every rank and read back what each saved, with the wall time."""
    seconds = _run_ranks(worker, tmp)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"ranks": ranks, "seconds": seconds}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    return _ranks_results(_worker, tmp_path_factory.mktemp("ddp"))


def _missing_grads_worker(rank: int, store: str, out_dir: str) -> None:
    """Parameter 0 has a gradient on rank 1 only, parameter 1 on no rank."""
    dist.init_process_group("gloo", f"file://{store}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    if rank == 1:
        params[0].grad = torch.arange(3.0)
    reduce_gradients(params)
    torch.save([p.grad for p in params], Path(out_dir) / f"grads{rank}.pt")
    dist.destroy_process_group()


def test_reduction_keeps_missing_gradients_missing(tmp_path):
    _run_ranks(_missing_grads_worker, tmp_path)
    for rank in range(WORLD):
        first, second = torch.load(tmp_path / f"grads{rank}.pt")
        assert torch.equal(first, torch.arange(3.0)) and second is None


def _single_process_grads(agg: str, ranks: list[dict]) -> dict[str, torch.Tensor]:
    """The same global batch (both ranks' rollouts, in rank order) through one process."""
    cfg = _cfg(agg)
    model, _ = _model(cfg)
    rollouts = [ro for rank in ranks for ro in rank[agg]["rollouts"]]
    exp = build_experience(model, rollouts, torch.tensor(REWARDS), cfg)
    policy_update(model, exp, cfg, lambda loss: loss.backward())
    return _grads(model)


@pytest.mark.parametrize("agg", AGGS)
def test_reduced_gradients_equal_single_process(two_ranks, agg):
    ranks = two_ranks["ranks"]
    single = _single_process_grads(agg, ranks)
    for rank in ranks:
        reduced = rank[agg]["grads"]
        assert reduced.keys() == single.keys()
        for name, grad in single.items():
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(reduced[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_unequal_chunk_counts_finish(two_ranks):
    """Rank 0 backpropagates once, rank 1 several times; both reach the one reduction (no per-backward sync)."""
    counts = [rank["dapo"]["backwards"] for rank in two_ranks["ranks"]]
    assert counts[0] == 1 and counts[1] > 1, counts
    assert two_ranks["seconds"] < TIMEOUT_S


# --- sharding and config --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def datamodule():
    cfg = load_config(TINY, ["rollout.batch_size=8", "data.size=24"])
    dm = build_datamodule(cfg, tiny_tokenizer())
    dm.setup()
    return dm


def test_shards_make_up_the_single_process_batch(datamodule, monkeypatch):
    whole = datamodule._train_batch(5)["ids"]
    shards = []
    for rank in range(WORLD):
        monkeypatch.setattr(pte.training.data, "rank_world", lambda rank=rank: (rank, WORLD))
        shards += datamodule._train_batch(5)["ids"]
    assert shards == whole and len(set(whole)) == len(whole) == 4


def test_sharded_stream_position_is_global(datamodule, monkeypatch):
    """Each rank advances the stream by the global batch, so any rank's saved position resumes every rank."""
    monkeypatch.setattr(pte.training.data, "rank_world", lambda: (1, WORLD))
    monkeypatch.setattr(datamodule, "_offset", 0)
    stream = iter(datamodule.train_dataloader())
    first, second = next(stream), next(stream)
    assert datamodule._offset == 8  # two global batches of 4 prompts
    assert second["ids"] == datamodule._train_batch(4)["ids"] != first["ids"]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["trainer.devices=3"], "rollout.batch_size"),  # 2 prompts per step over 3 processes
        (["trainer.devices=2", "rollout.micro_batch=4"], "rollout.micro_batch"),  # 2 sequences per process
        (["trainer.strategy=deepspeed"], "trainer.strategy"),
        (["trainer.num_nodes=0"], "trainer.num_nodes"),
    ],
)
def test_config_refuses_what_cannot_be_sharded(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_config(TINY, overrides)


def test_several_processes_use_the_replay_strategy():
    assert build_strategy(load_config(TINY).trainer) == "auto"
    strategy = build_strategy(load_config(TINY, ["trainer.devices=2", "rollout.micro_batch=2"]).trainer)
    assert type(strategy).__name__ == "ReplayDDPStrategy"


def test_evaluation_splits_prompts_and_gathers_records(datamodule, monkeypatch):
    """Rank 1 of 2 evaluates every other held-out prompt; the summary is over every rank's records."""
    cfg = load_config(TINY, ["rollout.max_new_tokens=2"])
    model, tok = build_model(cfg)
    module = SimpleNamespace(model=model, tokenizer=tok, policy_name="pte", grader=None)
    gathered = []

    def gather(records):
        gathered.append([r["id"] for r in records])
        return [[{**r, "id": "other"} for r in records], records]

    monkeypatch.setattr(pte.training.callbacks, "rank_world", lambda: (1, WORLD))
    monkeypatch.setattr(pte.training.callbacks, "gather_object", gather)
    monkeypatch.setattr(pte.training.callbacks, "grade_groups", lambda grader, answers, *_: [[False] for _ in answers])
    monkeypatch.setattr(pte.training.callbacks, "Grader", lambda *_: SimpleNamespace(close=lambda: None))
    callback = EvalCallback(cfg, datamodule, every=1, limit=4)
    metrics, _ = callback.evaluate(module)
    callback.teardown(None, module, "fit")
    assert gathered == [[e.id for e in datamodule.val_examples[1:4:2]]]
    assert metrics["val/accuracy"] == 0.0


# --- the whole loop under Lightning's launcher -------------------------------------------------------------------


def _budget_for_unequal_windows(cfg) -> int:
    """A token budget that leaves the two ranks' first prompts different windows, hence different chunk counts."""
    dm = build_datamodule(cfg, tiny_tokenizer())
    dm.setup()
    whole = dm._train_batch(0)["prompts"]
    tok = tiny_tokenizer()
    lengths = [int(encode_prompts(tok, [p], chat=False)[1].sum()) for p in whole]
    assert lengths[0] != lengths[1], "pick another seed: both ranks' prompts have the same length"
    return max(lengths) + 8


DDP = ["trainer.strategy=ddp", "trainer.devices=2", "rollout.micro_batch=2"]


def _train_ddp(out_dir: Path, *overrides: str, launch: tuple[str, ...] = tuple(DDP)) -> Path:
    """train.py with two CPU processes under Lightning's launcher (``launch``: the strategy's overrides); returns the
    run directory."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "train.py", "--config", TINY, f"trainer.out_dir={out_dir}", "trainer.run_name=ddp"]
    # Its own session, so a hang kills rank 1 (launched by rank 0) along with rank 0.
    proc = subprocess.Popen(
        [*cmd, *launch, *overrides],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output = proc.communicate(timeout=TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"two-process training still running after {TIMEOUT_S} s (hang)")
    assert proc.returncode == 0, output[-3000:]
    assert "Starting with 2 processes" in output
    return out_dir / "ddp"


@pytest.mark.slow
def test_ddp_trains_and_evaluates_on_two_cpu_processes(tmp_path):
    """Two steps and two held-out evaluations; the ranks' prompts get different windows, so unequal chunk counts."""
    budget = _budget_for_unequal_windows(load_config(TINY, DDP))
    run_dir = _train_ddp(
        tmp_path, "trainer.max_steps=2", "cache.window=0", f"cache.budget={budget}", "trainer.val_every=1"
    )
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and (run_dir / "adapter").exists()
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/reward_mean", "train/grad_norm", "val/accuracy"} <= tags
    assert [e.step for e in acc.Scalars("val/accuracy")] == [1, 2]


@pytest.mark.slow
def test_ddp_resume_is_exact(tmp_path):
    """Two steps straight equal one step, a checkpoint and one resumed step, on two processes: same weights, and
    each rank's sampler and the global stream position come back."""
    straight = _train_ddp(tmp_path / "a", "trainer.max_steps=2")
    first = _train_ddp(tmp_path / "b", "trainer.max_steps=1")
    ckpt = first / "checkpoints" / "last.ckpt"
    one = torch.load(ckpt, weights_only=False)
    assert len(one["pte_sampler_rng"]) == WORLD and not torch.equal(*one["pte_sampler_rng"])
    _train_ddp(tmp_path / "b", "trainer.max_steps=2", f"ckpt_path={ckpt}")
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(ckpt, weights_only=False)
    assert b["global_step"] == 2 and b["MathDataModule"] == a["MathDataModule"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
