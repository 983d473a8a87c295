"""`make gpu-smoke`: the paper's per-GPU settings for two training steps and one evaluation, in < 5 min on one GPU.

A paper-width model (R1-Distill-Llama-8B's layer shapes and 128K vocabulary, two layers, random weights, bf16) goes
through the real entry points, ``train.main`` then ``eval.main`` on its adapter, with configs/deepseek_llama8b.yaml
(rollout and replay micro-batches, chunk cap, checkpointing, generation limits, eval.max_rows) plus overrides that
make it one process, offline and short. The JSON records peak memory (training: the run's own per-phase CUDA peaks
from TensorBoard; evaluation: max allocated / reserved) beside the memory planner's prediction for the same
settings, so the planner is checked against a GPU. ``--tiny`` runs the identical path at toy width on a CPU
(tests/test_gpu_smoke.py): whatever a CPU can catch fails there, not in a lent GPU's minutes.

    python -m scripts.gpu_smoke [--tiny] [--method pte] [--out runs/gpu_smoke] [key=value ...]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import eval as eval_cli
import train
from pte.config import Config, load_config
from pte.models.tiny import tiny_tokenizer
from pte.plan import plan
from pte.training.memory import max_rss_bytes
from pte.training.module import build_datamodule

log = logging.getLogger("gpu_smoke")
ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "deepseek_llama8b.yaml"
# R1-Distill-Llama-8B's shapes with 2 of its 32 layers: ~1.5 B parameters, 3 GiB in bf16.
PAPER_WIDTH = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
}
TINY_WIDTH = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
}
# One process of the paper run, offline: one rollout micro-batch (4 prompts x 8 = 32 rows, the per-micro-batch peak
# of the paper's 64 rows per GPU), arithmetic prompts, no hub, a fresh run directory.
COMMON = [
    "trainer.devices=1",
    "trainer.strategy=auto",
    "trainer.max_steps=2",
    "trainer.val_every=0",
    "trainer.ckpt_every=0",
    "trainer.overwrite=true",
    "trainer.run_name=train",
    "rollout.batch_size=32",
    "data.source=reasoning_gym",
    "data.template=chat",
    "reward.workers=1",
]
# Eval at the config's eval.max_rows, its longest window and generation limit: one row batch of max_rows problems.
EVAL = ["benchmarks=[arithmetic]", "n_samples=1"]
# The same path at toy size on a CPU: short rollouts and a window that still evicts.
TINY = [
    "trainer.accelerator=cpu",
    "rollout.batch_size=4",
    "rollout.group_size=2",
    "rollout.micro_batch=4",
    "replay.micro_batch=2",
    "replay.max_chunk_tokens=8",
    "replay.logits_chunk=16",
    "rollout.max_new_tokens=24",
    "eval.max_new_tokens=24",
    "eval.max_rows=2",
    "eval.batch_size=2",
    "cache.window=8",
    "eval.windows=[8]",
    "thought.rank=4",
    "thought.global_tokens=4",
    "data.size=32",
    "data.val_size=4",
]


def llama_config(width: dict[str, Any], pad_id: int = 0, eos_id: int = 1) -> LlamaConfig:
    """A 2-layer Llama of ``width`` with an untied LM head (as R1-Distill-Llama-8B's)."""
    return LlamaConfig(
        **width,
        num_hidden_layers=2,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
    )


def build_model_dir(path: Path, width: dict[str, Any], dtype: torch.dtype) -> Path:
    """Write a random 2-layer Llama of ``width`` with the tiny character tokenizer, loadable as ``model.name``.

    The tokenizer covers ~100 ids; the model samples from its whole vocabulary and decoding drops the rest, so
    responses run to the generation limit, the memory worst case.
    """
    tok = tiny_tokenizer()
    config = llama_config(width, tok.pad_token_id, tok.eos_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # initialise where it runs: seconds on a GPU instead of a minute on its host
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path


def train_peaks(run_dir: Path) -> dict[str, float]:
    """The largest value of every ``memory/peak_*_mib`` scalar training logged (per phase and process-wide)."""
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = [t for t in acc.Tags()["scalars"] if t.startswith("memory/peak_")]
    return {t.removeprefix("memory/"): max(e.value for e in acc.Scalars(t)) for t in tags}


def device_peaks() -> dict[str, float]:
    """Peak memory since the last reset in MiB: CUDA max allocated and reserved, or the process's resident peak."""
    if not torch.cuda.is_available():
        return {"peak_rss_process_mib": max_rss_bytes() / 2**20}
    return {
        "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
        "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
    }


def longest_prompt(cfg: Config) -> int:
    """Tokens in the longest prompt of the batches training draws: the planner's P (and W, under the paper's rule)."""
    tok = AutoTokenizer.from_pretrained(cfg.model.name)
    data = build_datamodule(cfg, tok)
    data.setup()
    batches = itertools.islice(iter(data.train_dataloader()), cfg.trainer.max_steps)
    return max(len(tok(prompt).input_ids) for batch in batches for prompt in batch["prompts"])


def planner_prediction(cfg: Config) -> dict[str, Any]:
    """pte.plan's per-phase MiB for ``cfg`` on one device of this machine's size, at the run's real prompt length."""
    cuda = torch.cuda.is_available()
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 40.0
    p_len = longest_prompt(cfg)
    p = plan(cfg, gpu_mem_gb=gpu_gib, world=1, prompt_len=p_len, device="cuda" if cuda else "cpu")
    return {
        "prompt_len": p_len,
        "gpu_mem_gib": gpu_gib,
        "phases_mib": {ph.name: ph.total / 2**20 for ph in p.phases},
        "train_peak_mib": p.train_peak / 2**20,
        "fits": p.fits,
        "table": str(p).splitlines(),
    }


def measured_over_planned(result: dict[str, Any]) -> dict[str, float]:
    """CUDA peak allocated over the planner's figure, for training (process-wide) and eval.py; empty on a CPU."""
    planned, train_mem, eval_mem = result["planner"], result["train"]["memory"], result["eval"]["memory"]
    if "peak_allocated_process_mib" not in train_mem:
        return {}
    return {
        "train": train_mem["peak_allocated_process_mib"] / planned["train_peak_mib"],
        "eval": eval_mem["peak_allocated_mib"] / planned["phases_mib"]["eval"],
    }


def smoke_overrides(model_dir: Path, method: str, out: Path, tiny: bool, extra: list[str]) -> list[str]:
    """The overrides of CONFIG for this run: the local model, one short offline process, toy sizes if ``tiny``."""
    return [
        f"model.name={model_dir}",
        f"method={method}",
        f"trainer.out_dir={out}",
        *COMMON,
        *(TINY if tiny else []),
        *extra,
    ]


def run(out: Path, method: str, tiny: bool, extra: list[str]) -> dict[str, Any]:
    """Build the model, train two steps, evaluate once; write and return ``out/smoke.json``."""
    out.mkdir(parents=True, exist_ok=True)
    width = TINY_WIDTH if tiny else PAPER_WIDTH
    start = time.perf_counter()
    model_dir = build_model_dir(out / "model", width, torch.bfloat16)
    overrides = smoke_overrides(model_dir, method, out, tiny, extra)
    cfg = load_config(CONFIG, overrides)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "model": {**width, "num_hidden_layers": 2, "dtype": cfg.model.dtype},
        "method": method,
        "overrides": overrides,
        "build_s": time.perf_counter() - start,
        "planner": planner_prediction(cfg),  # first: a setting the planner cannot price fails before any training
    }
    start = time.perf_counter()
    metrics = train.main(["--config", str(CONFIG), *overrides])
    run_dir = out / cfg.trainer.run_name
    result["train"] = {"seconds": time.perf_counter() - start, "metrics": metrics, "memory": train_peaks(run_dir)}
    gc.collect()  # training's module and trainer, so eval.py's peak is its own
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    held = {"held_at_start_mib": torch.cuda.memory_allocated() / 2**20} if torch.cuda.is_available() else {}
    window = max(cfg.eval.windows or [cfg.cache.window])
    eval_args = [f"ckpt={run_dir / 'adapter'}", *EVAL, f"limit={cfg.eval.max_rows}", f"windows=[{window}]"]
    eval_args += [f"policies=[{cfg.eval_policy}]", f"eval.out_dir={out / 'eval'}"]
    shutil.rmtree(out / "eval", ignore_errors=True)  # eval.py skips the records it finds: a rerun must measure again
    start = time.perf_counter()
    eval_cli.main(eval_args)  # the checkpoint brings the run's config, eval section included
    result["eval"] = {"seconds": time.perf_counter() - start, "args": eval_args, "memory": {**device_peaks(), **held}}
    result["measured_over_planned"] = measured_over_planned(result)
    (out / "smoke.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m scripts.gpu_smoke", description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="toy width on a CPU (the CPU test of this script)")
    p.add_argument("--method", default="pte", choices=["pte", "lora", "lora_c"], help="method to train")
    p.add_argument("--out", default="runs/gpu_smoke", help="model, run, eval and smoke.json go here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="further config overrides")
    args = p.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        p.error("needs a CUDA device (--tiny runs it on a CPU)")
    result = run(Path(args.out), args.method, args.tiny, args.overrides)
    log.info("wrote %s:\n%s", Path(args.out) / "smoke.json", json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
