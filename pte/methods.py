"""The four methods of the paper's table in one place: base, LoRA (full cache), LoRA_c (window cache), PTE.

Builds the trainable model for a config, exports adapters (a peft directory for LoRA, PTE parameters
with their config), and loads them back for evaluation or ``pte.generate``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pte.config import Config, ConfigError, load_config, to_yaml
from pte.encoder import attach_thought, load_thought, save_thought
from pte.models import load_model_and_tokenizer


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


def build_model(cfg: Config) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Base model plus the method's adapter, ready to train (only adapter parameters require grad).

    With ``model.adapter`` the adapter starts from that export's weights (e.g. an SFT warm start for GRPO).
    """
    model, tok = load_base(cfg)
    model = add_adapter(model, cfg)
    if cfg.model.adapter:
        warm_start(model, cfg.method, Path(cfg.model.adapter))
    return model, tok


def warm_start(model: nn.Module, method: str, adapter_dir: Path) -> None:
    """Copy an adapter export's weights into the freshly attached adapter of the same method and shape."""
    files = {"pte": "pte_adapter.safetensors", "lora": "adapter_model.safetensors"}
    path = adapter_dir / files["lora" if method == "lora_c" else method]
    if not path.is_file():
        raise ConfigError(f"model.adapter: no {path.name} in {adapter_dir} (an adapter export of method={method}?)")
    weights = load_file(str(path))
    if method == "pte":
        result = model.load_state_dict(weights, strict=False)
        missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(weights)
        if result.unexpected_keys or missing:
            raise ConfigError(f"model.adapter: {adapter_dir} does not match this model's PTE adapter")
    else:
        result = set_peft_model_state_dict(model, weights)
        if result.unexpected_keys:
            raise ConfigError(f"model.adapter: {adapter_dir} does not match this model's LoRA adapter")


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


def load_trained(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[nn.Module, PreTrainedTokenizerBase, Config]:
    """Rebuild a trained policy from a Lightning checkpoint (``.ckpt``) or an adapter export directory.

    The saved config supplies model and method; ``overrides`` (``key=value``) change the rest (cache, eval...).
    """
    path = Path(path)
    if path.is_dir():
        cfg = load_config(path / "config.yaml", overrides)
        model, tok = load_base(cfg)
        return load_adapter(model, cfg.method, path), tok, cfg
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = load_config(None, overrides, base=ckpt["hyper_parameters"]["run_config"])
    model, tok = build_model(cfg)
    weights = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    result = model.load_state_dict(weights, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if result.unexpected_keys or trainable - set(weights):
        raise ValueError(
            f"{path}: checkpoint does not match method={cfg.method} (unexpected {result.unexpected_keys[:3]})"
        )
    return model.eval(), tok, cfg
