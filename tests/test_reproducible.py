"""A run's outcome depends on ``seed`` only: not on whether its toy base was built in this process or loaded from
the cache (a fresh clone builds it inside its first run; every later run loads it)."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from pte.config import Config, load_config
from pte.models import toy as toy_base
from pte.models.tiny import tiny_model, tiny_tokenizer
from pte.models.toy import ToySpec, train_toy_base
from pte.training.methods import build_model
from pte.training.module import GRPOModule, build_datamodule

DEFAULT = str(Path(__file__).resolve().parent.parent / "configs" / "default.yaml")
TINY_SPEC = ToySpec(
    steps=(3, 3),
    values=(1, 1),
    held_out=(),
    hidden=16,
    layers=1,
    heads=2,
    kv_heads=1,
    train_steps=2,
    batch=2,
    eval_problems=2,
    lookup_steps=2,
    polish_rounds=1,
    polish_steps=2,
    polish_problems=2,
    polish_target=1.01,
)  # all three phases, the polish one trained (no tiny build meets a target above 1)
SMALL = ["data.carry_steps=3", "data.size=16", "data.val_size=2", "rollout.batch_size=4", "rollout.micro_batch=4"]


@pytest.fixture(autouse=True)
def _seed_env(monkeypatch):
    """``seed_everything`` sets these variables; monkeypatch puts back what was there before the test."""
    for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.delenv(var, raising=False)


def start_run(cfg: Config) -> tuple[dict[str, torch.Tensor], dict, list[float]]:
    """What train.py does up to the first training step: seed, build the module and the data, take the first batch.

    Returns:
        ``(trainable tensors, first batch, one draw from each global stream: torch, numpy, python random)``.
    """
    L.seed_everything(cfg.seed, workers=True)
    module = GRPOModule.from_config(cfg)
    datamodule = build_datamodule(cfg, module.tokenizer)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    adapter = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    return adapter, batch, [torch.rand(()).item(), float(np.random.rand()), random.random()]


def test_first_step_is_the_same_whether_the_toy_base_was_built_now_or_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PTE_CACHE", str(tmp_path))
    monkeypatch.setattr(toy_base, "DEFAULT_SPEC", TINY_SPEC)
    cfg = load_config(DEFAULT, SMALL)
    built = start_run(cfg)
    assert (tmp_path / TINY_SPEC.name / "toy_base.json").is_file(), "the first run did not build the toy base"
    cached = start_run(cfg)
    assert built[0].keys() == cached[0].keys() and built[0]
    for name, tensor in built[0].items():
        assert torch.equal(tensor, cached[0][name]), f"{name} initialised differently"
    assert built[1] == cached[1], "the first batch differs"
    assert built[2] == cached[2], "the toy base build left the global random streams elsewhere"


def test_building_the_toy_base_leaves_the_global_random_streams_alone(tmp_path):
    L.seed_everything(3)
    expected = [torch.rand(()).item(), float(np.random.rand()), random.random()]
    L.seed_everything(3)
    train_toy_base(TINY_SPEC, tmp_path / "toy", tiny_tokenizer())
    assert [torch.rand(()).item(), float(np.random.rand()), random.random()] == expected


def trainable(cfg: Config) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in build_model(cfg)[0].named_parameters() if p.requires_grad}


def test_adapter_initialisation_depends_on_the_seed_only(tmp_path):
    """Whatever drew from the global generator before, a base loaded from a directory gets the same adapter for the
    same seed (and another one for another seed)."""
    model, tok = tiny_model("llama", len(tiny_tokenizer())), tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = load_config(DEFAULT, [f"model.name={tmp_path}", *SMALL])
    first = trainable(cfg)
    torch.rand(100)
    again = trainable(cfg)
    assert first.keys() == again.keys() and all(torch.equal(p, again[n]) for n, p in first.items())
    other = trainable(load_config(DEFAULT, [f"model.name={tmp_path}", *SMALL, "seed=1"]))
    assert not any(torch.equal(p, other[n]) for n, p in first.items() if p.abs().sum() > 0)
