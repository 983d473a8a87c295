"""Every YAML in configs/ loads and validates offline; every key is commented; bad configs name the key; the paper
configs are one shared base (paper.yaml) plus per-model overlays that change only the model's own keys."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pte.config import Config, ConfigError, load_config, load_yaml
from pte.plan import plan

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))
PAPER = [p for p in CONFIGS if p.stem.startswith(("paper", "qwen", "deepseek"))]
OVERLAYS = [p for p in PAPER if p.stem != "paper"]
MODEL_KEYS = {"model.name", "data.template", "trainer.run_name"}  # what a paper overlay may set besides `base`


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"a.b": value}`` for every leaf of a nested mapping (``eval.paths`` is one value: its keys are data)."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        is_group = isinstance(value, dict) and name != "eval.paths"
        out |= _flat(value, f"{name}.") if is_group else {name: value}
    return out


def _keys(path: Path) -> dict[str, object]:
    return _flat(OmegaConf.to_container(load_yaml(path)))


def test_expected_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"default", "tiny", "paper", "qwen2.5_3b", "qwen2.5_7b", "deepseek_llama8b"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_every_key_is_commented(path):
    cfg = load_config(path)
    assert cfg.rollout.batch_size % cfg.rollout.group_size == 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if re.match(r"^\s*\w+:", line) and not re.match(r"^\w+:\s*$", line):
            assert "#" in line, f"{path.name}:{n} has no comment: {line!r}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_with_its_bases_sets_every_schema_key(path):
    """A YAML (over its bases) mirrors the whole schema, so every knob is documented where a run is chosen."""
    schema = _flat(OmegaConf.to_container(OmegaConf.structured(Config)))
    assert set(_keys(path)) == set(schema)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_configs_carry_paper_settings(path):
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.optim.grad_clip, cfg.thought.rank, cfg.thought.global_tokens) == (1e-5, 1.0, 32, 32)
    assert (cfg.rollout.max_new_tokens, cfg.cache.evict_ratio, cfg.cache.window) == (3072, 0.25, 0)
    assert (cfg.rollout.batch_size, cfg.rollout.group_size) == (512, 8)
    assert (cfg.trainer.devices, cfg.trainer.accelerator, cfg.model.dtype) == (8, "gpu", "bfloat16")
    assert cfg.data.hf_name == "BytedTsinghua-SIA/DAPO-Math-17k"


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: p.stem)
def test_paper_overlay_changes_only_model_keys(path):
    raw = _flat(OmegaConf.to_container(OmegaConf.load(path)))
    assert raw.pop("base") == "paper.yaml"
    assert set(raw) <= MODEL_KEYS
    base, resolved = _keys(path.with_name("paper.yaml")), _keys(path)
    assert {k for k in base if base[k] != resolved[k]} <= MODEL_KEYS


def test_overlays_name_distinct_models_and_runs():
    cfgs = [load_config(p) for p in OVERLAYS]
    assert len({c.model.name for c in cfgs}) == len({c.trainer.run_name for c in cfgs}) == len(OVERLAYS) == 3


def test_base_resolves_relative_to_the_overlay_and_nests(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("seed: 1\noptim:\n  lr: 0.5\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../root.yaml\nseed: 2\nrollout:\n  group_size: 2\n")
    (tmp_path / "sub" / "top.yaml").write_text("base: mid.yaml\nseed: 3\n")
    monkeypatch.chdir(tmp_path.parent)  # resolution must not depend on the working directory
    cfg = load_config(tmp_path / "sub" / "top.yaml", ["optim.weight_decay=0.1"])
    assert (cfg.seed, cfg.optim.lr, cfg.rollout.group_size, cfg.optim.weight_decay) == (3, 0.5, 2, 0.1)


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"a.yaml": "base: missing.yaml\n"}, r"^base: a\.yaml overlays missing\.yaml"),
        ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, r"^base: .*loops \(a\.yaml -> b\.yaml -> a\.yaml\)"),
    ],
    ids=["missing", "loop"],
)
def test_bad_base_names_the_key(tmp_path, files, match):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / "a.yaml")


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


@pytest.mark.parametrize("method", ["pte", "lora_c"])
@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: p.stem)
def test_paper_configs_fit_40_gib_per_gpu(path, method):
    """The paper's hardware (8 x A100-40GB): the planner fits training and eval.py of pte and lora_c per GPU."""
    p = plan(load_config(path, [f"method={method}"]), gpu_mem_gb=40)
    assert p.setup.world == 8 and p.fits, str(p)


def test_sampling_knobs_are_declared_once():
    """rollout and eval share SamplingCfg's fields (none redeclared), whose defaults are the engine's."""
    from pte.config import EvalCfg, RolloutCfg, SamplingCfg
    from pte.engine.rollout import SamplingConfig

    names = set(SamplingCfg.__dataclass_fields__)
    for cls in (RolloutCfg, EvalCfg):
        assert issubclass(cls, SamplingCfg)
        assert not names & set(vars(cls).get("__annotations__", {})), cls.__name__
    assert SamplingCfg().sampling() == SamplingConfig()
