"""Fixed decode shapes under rollout.compile: one compilation per prompt bucket, kept K/V storage, loud failures."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from pte.config import ConfigError, load_config
from pte.engine.cache import CachePolicy
from pte.engine.generate import encode_prompts
from pte.engine.rollout import SamplingConfig, rollout
from pte.engine.shapes import kv_store
from pte.engine.update import bucket_capacity, generate_rollouts
from pte.training.prompts import config_prompt
from tests.helpers import PROMPTS, tiny_pte

QUESTIONS = ["Hi", "What is 12 + 30? Think.", "Count: 1 2 3", "What is 7 + 5?"]  # 92 to 113 tokens formatted
COMPILED = ["rollout.compile=true", "rollout.prompt_buckets=[100,128]"]


def config(*extra: str):
    base = ["rollout.batch_size=4", "rollout.group_size=2", "rollout.micro_batch=2", "rollout.max_new_tokens=24"]
    return load_config("configs/tiny.yaml", [*base, "cache.window=8", *extra])


@pytest.fixture
def eager_backend(monkeypatch):
    """torch.compile with the ``eager`` backend: Dynamo traces, guards and recompiles as with Inductor, in a second
    rather than minutes; its counters start from zero."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="eager", dynamic=False))
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_one_compilation_per_bucket_over_a_run(eager_backend):
    """Six steps whose blocks' longest prompts fall in both buckets (and vary inside them) compile the decode step
    twice, reuse one K/V storage, and sample what eager decoding samples."""
    model, tok = tiny_pte()
    steps = [QUESTIONS[:1] * 2, QUESTIONS[1:3], QUESTIONS[:1] * 2, QUESTIONS[2:4], QUESTIONS[3:4] * 2, QUESTIONS[:2]]
    storage = set()
    for i, questions in enumerate(steps):
        prompts = [config_prompt(tok, config().data, q) for q in questions for _ in range(2)]
        out = {}
        for name, extra in (("eager", []), ("compiled", COMPILED)):
            gen = torch.Generator().manual_seed(i)
            (out[name],) = generate_rollouts(model, tok, prompts, config(*extra), "pte", gen)
        storage.add(kv_store(model).keys[0].data_ptr())
        assert torch.equal(out["compiled"].response_ids, out["eager"].response_ids)
        torch.testing.assert_close(out["compiled"].logprobs, out["eager"].logprobs, atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == 2
    assert len(storage) == 1, "the K/V buffers must keep their addresses across rollouts"


def test_a_compilation_past_the_budget_fails_loudly(eager_backend):
    """A third cache shape with a budget of two compilations raises instead of decoding eagerly in silence."""
    model, tok = tiny_pte()
    ids, mask = encode_prompts(tok, PROMPTS)
    policy = CachePolicy("pte", window=8)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=4, compile=True, max_compiles=2)
    for slots in (100, 110):
        rollout(model, ids, mask, policy, sampling, [], tok.pad_token_id, capacity=slots)
    with pytest.raises(Exception, match="recompile_limit"):
        rollout(model, ids, mask, policy, sampling, [], tok.pad_token_id, capacity=120)


def test_bucket_capacity_covers_every_window_of_the_bucket():
    """Fixed window: bucket + W. Paper rule (W = longest prompt): the bucket twice. Budget (W = budget - longest): the
    bucket plus the window of the shortest longest-prompt the bucket takes."""
    buckets = "rollout.prompt_buckets=[64,128]"
    for extra, expected in (
        (["cache.window=8"], 128 + 8),
        (["cache.window=0"], 2 * 128),
        (["cache.budget=200"], 128 + 135),
    ):
        cfg = config(buckets, *extra)
        if extra != ["cache.window=8"]:
            cfg.cache.window = 0
        policy = cfg.cache.policy_for(100, "pte")
        assert bucket_capacity(cfg, policy, 100) == expected >= policy.capacity(100, 24)
    with pytest.raises(ConfigError, match="rollout.prompt_buckets"):
        bucket_capacity(config(buckets), policy, 129)


def test_compile_needs_buckets():
    with pytest.raises(ConfigError, match="rollout.prompt_buckets"):
        config("rollout.compile=true")
