"""Every YAML in configs/ loads and validates offline; every key is commented; bad configs name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pte.config import ConfigError, load_config

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))


def test_expected_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"default", "tiny", "qwen2.5_3b", "qwen2.5_7b", "deepseek_llama8b"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_every_key_is_commented(path):
    cfg = load_config(path)
    assert cfg.rollout.batch_size % cfg.rollout.group_size == 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if re.match(r"^\s*\w+:", line) and not re.match(r"^\w+:\s*$", line):
            assert "#" in line, f"{path.name}:{n} has no comment: {line!r}"


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem.startswith(("qwen", "deepseek"))], ids=lambda p: p.stem)
def test_paper_configs_carry_paper_settings(path):
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.optim.grad_clip, cfg.thought.rank, cfg.thought.global_tokens) == (1e-5, 1.0, 32, 32)
    assert (cfg.rollout.max_new_tokens, cfg.cache.evict_ratio, cfg.cache.window) == (3072, 0.25, 0)
    assert cfg.data.hf_name == "BytedTsinghua-SIA/DAPO-Math-17k"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("cache.windw=3", "cache.windw"),
        ("rollout.max_new_tokens=lots", "rollout.max_new_tokens"),
        ("rollout.batch_size=6", "rollout.batch_size"),
        ("rollout.micro_batch=3", "rollout.micro_batch"),
        ("method=sft", "method"),
        ("cache.policy=lru", "cache.policy"),
        ("grpo.loss_agg=mean", "grpo.loss_agg"),
        ("unknown_top=1", "unknown_top"),
    ],
)
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(CONFIGS[0], [override])


def test_method_and_policy_must_agree():
    with pytest.raises(ConfigError, match="cache.policy"):
        load_config(None, ["method=lora_c", "cache.policy=pte"])
