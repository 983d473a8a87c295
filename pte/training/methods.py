"""The four methods of the paper's table in one place: base, LoRA (full cache), LoRA_c (window cache), PTE.

Builds the trainable model for a config, exports adapters (a peft directory for LoRA, PTE parameters
with their config), and loads them back for evaluation or ``pte.generate``.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pte.config import Config, ConfigError, load_config, to_yaml
from pte.engine.calibrate import calibrate
from pte.engine.encoder import attach_thought, get_thought, load_thought, load_thought_weights, save_thought
from pte.engine.generate import encode_prompts
from pte.engine.thought import ThoughtConfig
from pte.errors import UserError
from pte.models.load import load_model_and_tokenizer


class CheckpointError(UserError):
    """A checkpoint that cannot be read, or that belongs to another method or model than the one asked for."""


def load_base(cfg: Config) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    m = cfg.model
    return load_model_and_tokenizer(m.name, m.dtype, m.revision, m.attn_implementation, seed=cfg.seed)


def add_adapter(model: PreTrainedModel, cfg: Config) -> nn.Module:
    """Add the method's trainable parameters to a frozen base model."""
    if cfg.method == "pte":
        attach_thought(model, cfg.thought.build())
        return model
    if cfg.method in ("lora", "lora_c"):
        lc = cfg.lora
        return get_peft_model(
            model,
            LoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=0.0, target_modules=list(lc.target_modules)),
        )
    return model


def param_groups(model: nn.Module, lr: float, zero_factor_lr: float) -> list[dict]:
    """AdamW groups of the trainable parameters: the zero-initialised factor of each adapter (PTE's A ``lr_a``, LoRA's
    ``lora_B``) at ``lr * zero_factor_lr``, the rest at ``lr``. While that factor is zero the other factors get no
    gradient, so its learning rate sets how soon they start learning (LoRA+, Hayou et al. 2024)."""
    zero, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (zero if name.endswith("lr_a") or ".lora_B." in name else rest).append(p)
    groups = [{"params": rest, "lr": lr}, {"params": zero, "lr": lr * zero_factor_lr}]
    return [g for g in groups if g["params"]]


def build_model(cfg: Config) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Base model plus the method's adapter, ready to train (only adapter parameters require grad).

    The base takes ``model.dtype``; the adapter is float32 whatever it is (the precision rule,
    pte/training/precision.py).

    With ``model.adapter`` the adapter starts from that export's weights (e.g. an SFT warm start for GRPO).

    The adapter's initialisation draws from the global torch generator, seeded here with ``seed`` so that it does
    not depend on what loading the base drew before (a toy base built now, or loaded from the cache).
    """
    model, tok = load_base(cfg)
    torch.manual_seed(cfg.seed)
    model = add_adapter(model, cfg)
    if cfg.model.adapter:
        warm_start(model, cfg.method, Path(cfg.model.adapter))
    return model, tok


def calibrate_thought(
    model: nn.Module, tok: PreTrainedTokenizerBase, cfg: Config, prompts: list[str], solutions: list[str]
) -> tuple[list[float], int]:
    """Scale a fresh PTE adapter's global tokens for ``thought.init_move`` (pte/engine/calibrate.py) on the K/V of
    formatted ``prompts`` followed by their worked ``solutions`` (empty where there are none), with the eviction
    size of ``cache.window`` / ``cache.evict_ratio``. Returns the per-layer factors and that size."""
    device = next(model.parameters()).device
    ids, mask = encode_prompts(tok, [p + s for p, s in zip(prompts, solutions)], chat=False, device=device)
    longest = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    evicted = cfg.cache.policy_for(longest, "pte").evict_tokens
    return calibrate(model, ids, mask, cfg.thought.init_move, evicted), evicted


def warm_start(model: nn.Module, method: str, adapter_dir: Path) -> None:
    """Copy an adapter export's weights into the freshly attached adapter of the same method and shape."""
    files = {"pte": "pte_adapter.safetensors", "lora": "adapter_model.safetensors"}
    path = adapter_dir / files["lora" if method == "lora_c" else method]
    if not path.is_file():
        raise ConfigError(f"model.adapter: no {path.name} in {adapter_dir} (an adapter export of method={method}?)")
    weights = load_file(str(path))
    if method == "pte":
        _check_thought_shape(model, adapter_dir)
        if load_thought_weights(model, weights):
            raise ConfigError(f"model.adapter: {adapter_dir} does not match this model's PTE adapter")
    else:
        result = set_peft_model_state_dict(model, weights)
        if result.unexpected_keys:
            raise ConfigError(f"model.adapter: {adapter_dir} does not match this model's LoRA adapter")


# The thought.* keys that shape a PTE adapter's weights: a warm start (model.adapter) must match them.
SHAPE_KEYS = ("rank", "global_tokens", "target_modules", "evicted_context", "write_gate")


def _check_thought_shape(model: nn.Module, adapter_dir: Path) -> None:
    """Name the ``thought.*`` key whose value differs between a PTE export and this run's adapter (a shape mismatch
    would otherwise surface as torch's size-mismatch error)."""
    saved = json.loads((adapter_dir / "pte_config.json").read_text())
    ours = asdict(get_thought(model).cfg)
    for key in SHAPE_KEYS:
        old = saved.get(key, ThoughtConfig.__dataclass_fields__[key].default)  # exports before a key had its default
        if _plain(old) != _plain(ours[key]):
            raise ConfigError(
                f"thought.{key}: model.adapter {adapter_dir} was trained with {old!r}, this run has {ours[key]!r}"
            )


def _plain(value: object) -> object:
    """Lists and tuples compare as lists (JSON gives lists, the config tuples)."""
    return list(value) if isinstance(value, (list, tuple)) else value


def export_adapter(model: nn.Module, cfg: Config, out_dir: str | Path) -> Path:
    """Write what eval.py and ``pte.generate`` need: adapter weights plus the run's resolved config."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.method == "pte":
        save_thought(model, out)
    elif isinstance(model, PeftModel):
        model.save_pretrained(out)
    (out / "config.yaml").write_text(to_yaml(cfg))
    (out / "method.json").write_text(json.dumps({"method": cfg.method, "model": cfg.model.name}))
    return out


def load_adapter(model: PreTrainedModel, method: str, adapter_dir: str | Path) -> nn.Module:
    """Attach a saved adapter of ``method`` to a fresh base model."""
    if method == "pte":
        load_thought(model, adapter_dir)
        return model
    if method in ("lora", "lora_c"):
        return PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    return model


def read_checkpoint(path: str | Path) -> dict:
    """Load a Lightning ``.ckpt`` on the CPU; a truncated or foreign file raises CheckpointError, not a pickle error."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as err:
        raise CheckpointError(f"ckpt: {path} cannot be read (corrupt or not a torch checkpoint): {err}") from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("hyper_parameters", {}).get("run_config"), dict):
        raise CheckpointError(f"ckpt: {path} holds no run config (not a checkpoint of train.py)")
    return ckpt


def saved_config(path: str | Path) -> dict:
    """The run config stored with a checkpoint: ``config.yaml`` of an adapter export, or a .ckpt's hyperparameters."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"ckpt: {path} does not exist")
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise CheckpointError(f"ckpt: {path} has no config.yaml (not an adapter export of train.py)")
        try:
            return OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))
        except Exception as err:  # OmegaConf and yaml raise several types; all mean "unreadable"
            raise CheckpointError(f"ckpt: {path / 'config.yaml'} cannot be read: {err}") from err
    return read_checkpoint(path)["hyper_parameters"]["run_config"]


def check_matches(saved: dict, cfg: Config, path: str | Path) -> None:
    """Refuse to load a checkpoint under another method or base model than the one it was trained with."""
    method, model = saved.get("method"), (saved.get("model") or {}).get("name")
    if method != cfg.method:
        raise CheckpointError(f"ckpt: {path} is a method={method} checkpoint, but the run asks for method={cfg.method}")
    if model != cfg.model.name:
        raise CheckpointError(f"ckpt: {path} was trained on model.name={model}, but the run asks for {cfg.model.name}")


def _attach(model: PreTrainedModel, method: str, path: Path) -> nn.Module:
    """load_adapter, with unreadable or mismatching adapter files reported as CheckpointError."""
    try:
        return load_adapter(model, method, path)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        detail = " ".join(str(err).split())[:300]
        raise CheckpointError(f"ckpt: adapter {path} cannot be loaded onto this model: {detail}") from err


def load_trained(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[nn.Module, PreTrainedTokenizerBase, Config]:
    """Rebuild a trained policy from a Lightning checkpoint (``.ckpt``) or an adapter export directory.

    The saved config supplies model and method; ``overrides`` (``key=value``) change the rest (cache, eval...).

    Raises:
        CheckpointError: unreadable files, or weights that do not fit the method and model.
    """
    path = Path(path)
    if path.is_dir():
        saved = saved_config(path)
        cfg = load_config(None, overrides, base=saved)
        check_matches(saved, cfg, path)
        model, tok = load_base(cfg)
        return _attach(model, cfg.method, path), tok, cfg
    ckpt = read_checkpoint(path)
    saved = ckpt["hyper_parameters"]["run_config"]
    cfg = load_config(None, overrides, base=saved)
    check_matches(saved, cfg, path)
    model, tok = build_model(cfg)
    weights = {k.removeprefix("model."): v for k, v in ckpt.get("state_dict", {}).items()}
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shape mismatches: weights of another model size
        raise CheckpointError(f"ckpt: {path} does not fit model.name={cfg.model.name}: {str(err)[:200]}") from err
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if result.unexpected_keys or trainable - set(weights):
        raise CheckpointError(
            f"ckpt: {path} does not match method={cfg.method} (unexpected {result.unexpected_keys[:3]}, "
            f"missing {sorted(trainable - set(weights))[:3]})"
        )
    return model.eval(), tok, cfg
