"""Lightning glue: the cache-aware GRPO LightningModule and the DataModule built from a Config.

The module only wires: rollout -> rewards -> experience -> chunked update -> optimiser step -> logs. The
method lives in rollout.py, replay.py, thought.py and grpo.py.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import lightning as L
import torch
from omegaconf import OmegaConf

from pte.config import METHOD_POLICY, Config, as_dict, load_config
from pte.data import MathDataModule
from pte.generate import decode_responses
from pte.grpo import uniform_groups
from pte.memory import MemoryTracker
from pte.methods import build_model
from pte.prompts import few_shot_examples
from pte.rewards import Grader, build_reward
from pte.update import build_experience, generate_rollouts, policy_update


def build_datamodule(cfg: Config, tokenizer) -> MathDataModule:
    d = cfg.data
    return MathDataModule(
        tokenizer,
        d.source,
        tasks=list(d.tasks),
        size=d.size,
        name=d.hf_name,
        split=d.split,
        config=d.hf_config,
        revision=d.revision,
        path=d.path,
        question_field=d.question_field,
        answer_field=d.answer_field,
        limit=d.limit,
        val_size=d.val_size,
        prompts_per_step=cfg.rollout.prompts_per_step,
        seed=cfg.seed,
        template=d.template,
        system=d.system,
        few_shot=few_shot_examples(d),
        instruction=d.instruction,
    )


class GRPOModule(L.LightningModule):
    """Holds the policy (base model + method adapter), the reward and the cache-aware GRPO step.

    Args:
        run_config: the resolved config as a plain dict (saved as hyperparameters, so checkpoints rebuild the run).
    """

    def __init__(self, run_config: dict) -> None:
        super().__init__()
        self.save_hyperparameters({"run_config": run_config})
        self.cfg: Config = load_config(base=run_config)
        if self.cfg.method == "base":
            raise ValueError("method=base has nothing to train; use eval.py")
        self.model, self.tokenizer = build_model(self.cfg)
        self.policy_name = METHOD_POLICY[self.cfg.method]
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the trainable parameters only
        self.grader: Grader | None = None
        self.memory = MemoryTracker()
        self.generator: torch.Generator | None = None  # made on the model's device at the first step
        self._resumed_rng: torch.Tensor | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> GRPOModule:
        return cls(OmegaConf.to_container(as_dict(cfg), resolve=True))

    def setup(self, stage: str) -> None:
        if self.grader is None:
            self.grader = Grader(self.cfg.reward.timeout_s, self.cfg.reward.workers)
            spec = {"correctness": self.cfg.reward.correctness, "format": self.cfg.reward.format}
            self.reward = build_reward({k: w for k, w in spec.items() if w}, self.grader)

    def teardown(self, stage: str) -> None:
        if self.grader is not None:
            self.grader.close()
            self.grader = None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def training_step(self, batch: dict, batch_idx: int) -> None:
        cfg, n = self.cfg, self.cfg.rollout.group_size
        self.model.eval()  # no dropout anywhere: replay must reproduce the rollout exactly
        prompts = [p for p in batch["prompts"] for _ in range(n)]
        golds = [a for a in batch["answers"] for _ in range(n)]

        if self.generator is None:
            self.generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
            if self._resumed_rng is not None:
                self.generator.set_state(self._resumed_rng)
        self.memory.start("rollout")
        t0 = time.perf_counter()
        rollouts = generate_rollouts(self.model, self.tokenizer, prompts, cfg, self.policy_name, self.generator)
        t_rollout = time.perf_counter() - t0
        texts = [t for ro in rollouts for t in decode_responses(self.tokenizer, ro)]
        rewards, parts = self.reward(texts, golds)
        exp = build_experience(self.model, rollouts, rewards.to(self.device), cfg)
        self.memory.stop("rollout")

        opt = self.optimizers()
        t1 = time.perf_counter()
        for _ in range(cfg.grpo.updates_per_batch):
            opt.zero_grad()
            self.memory.start("replay")
            stats = policy_update(self.model, exp, cfg, self.manual_backward)
            self.memory.stop("replay")
            self.memory.start("optimizer")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), cfg.optim.grad_clip)
            opt.step()
            self.memory.stop("optimizer")
        self.lr_schedulers().step()
        self._log_step(rollouts, rewards, parts, stats, grad_norm, t_rollout, time.perf_counter() - t1)

    def _log_step(self, rollouts, rewards, parts, stats, grad_norm, t_rollout, t_update) -> None:
        tokens = sum(float(ro.response_mask.sum()) for ro in rollouts)
        ro_stats = [ro.stats() for ro in rollouts]

        def mean(key: str) -> float:
            return sum(s[key] for s in ro_stats) / len(ro_stats)

        logs = {
            "reward_mean": rewards.mean(),
            "reward_std": rewards.std(),
            "uniform_groups": float(uniform_groups(rewards, self.cfg.rollout.group_size)),
            "response_length": mean("response_length"),
            "truncated_frac": mean("truncated_frac"),
            "evictions_per_seq": mean("evictions"),
            "kv_bytes_held": mean("kv_bytes_held"),
            "kv_bytes_peak": max(s["kv_bytes_peak"] for s in ro_stats),
            "attn_tflops": sum(s["attn_tflops"] for s in ro_stats),
            "loss": stats["loss"],
            "kl": stats["kl"] / max(stats["tokens"], 1.0),
            "clip_frac": stats["clipped"] / max(stats["tokens"], 1.0),
            "entropy": stats["entropy"] / max(stats["tokens"], 1.0),
            "grad_norm": float(grad_norm),
            "lr": self.optimizers().param_groups[0]["lr"],
            "time_rollout_s": t_rollout,
            "time_update_s": t_update,
            "tokens_per_s": tokens / max(t_rollout, 1e-9),
        }
        logs.update({f"reward_{k}": v.mean() for k, v in parts.items()})
        logs["accuracy"] = parts["correctness"].mean() if "correctness" in parts else rewards.new_tensor(0.0)
        logs.update({f"mem_peak_{k}_bytes": v for k, v in self.memory.peaks().items()})
        self.log_dict({f"train/{k}": float(v) for k, v in logs.items()}, on_step=True, prog_bar=False)
        self.log("train/reward", rewards.mean(), prog_bar=True)

    def configure_optimizers(self):
        o = self.cfg.optim
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=o.lr, weight_decay=o.weight_decay)
        warm = max(o.warmup_steps, 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        return {"optimizer": opt, "lr_scheduler": sched}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only trainable tensors (the frozen base is rebuilt from the config) plus the sampler's state."""
        keep = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["pte_config"] = asdict(self.cfg)
        if self.generator is not None:
            checkpoint["pte_sampler_rng"] = self.generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resume sampling where it stopped, so a resumed run draws the samples an uninterrupted one would."""
        self._resumed_rng = checkpoint.get("pte_sampler_rng")
