"""Lightning glue: the cache-aware GRPO LightningModule and the DataModule built from a Config.

The module only wires: rollout -> rewards -> experience -> chunked update -> optimiser step -> logs. The
method lives in rollout.py, replay.py, thought.py and grpo.py.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict
from functools import partial

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf

from pte.config import METHOD_POLICY, Config, as_dict, load_config
from pte.engine.encoder import get_thought
from pte.engine.generate import decode_responses
from pte.engine.update import build_experience, generate_rollouts, policy_update, replay_limits
from pte.training.checkpoints import deferred_interrupts
from pte.training.collectives import all_mean, all_sum, broadcast_
from pte.training.data import MathDataModule
from pte.training.distributed import (
    ReplayFSDPStrategy,
    gather_object,
    global_step_totals,
    own_share,
    reduce_gradients,
    shard_frozen_base,
)
from pte.training.grpo import uniform_groups
from pte.training.memory import MemoryTracker
from pte.training.methods import build_model, calibrate_thought, param_groups
from pte.training.prompts import few_shot_examples
from pte.training.rewards import Grader, build_reward
from pte.training.sft import sft_update, teacher_forced

log = logging.getLogger(__name__)

CALIBRATION_TEXTS = 8  # held-out prompts (with their worked solutions) whose K/V calibrate thought.init_move


def build_datamodule(cfg: Config, tokenizer) -> MathDataModule:
    d = cfg.data
    return MathDataModule(
        tokenizer,
        d.source,
        tasks=list(d.tasks),
        size=d.size,
        carry_steps=d.carry_steps,
        carry_values=d.carry_values,
        carry_letters=d.carry_letters,
        name=d.hf_name,
        split=d.split,
        config=d.hf_config,
        revision=d.revision,
        path=d.path,
        question_field=d.question_field,
        answer_field=d.answer_field,
        limit=d.limit,
        val_size=d.val_size,
        prompts_per_step=cfg.rollout.batch_size if cfg.objective == "sft" else cfg.rollout.prompts_per_step,
        seed=cfg.seed,
        template=d.template,
        system=d.system,
        few_shot=few_shot_examples(d),
        instruction=d.instruction,
    )


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient (``trainer.max_nonfinite``)."""


def lr_factor(warmup: int, total: int, schedule: str, step: int) -> float:
    """Learning-rate multiplier at optimiser ``step``: linear warmup, then constant or a cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    done = min(1.0, (step - warmup) / (total - warmup))
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * done))


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
        self.nonfinite_steps = 0  # skipped steps over the whole run (checkpointed)
        self._nonfinite_streak = 0
        self.step_skipped = False  # the last step had a non-finite loss or gradient and was not applied
        self._commit = contextlib.ExitStack()  # holds signals from the optimiser step to the end of the batch
        self.step_metrics: dict[str, float] = {}  # the last step's scalars; pte.training.progress.StepLog writes them

    @classmethod
    def from_config(cls, cfg: Config) -> GRPOModule:
        return cls(OmegaConf.to_container(as_dict(cfg), resolve=True))

    def configure_model(self) -> None:
        """Under ``trainer.strategy=fsdp``, shard the frozen base over the ranks (Lightning calls this before setup)."""
        strategy = self.trainer.strategy
        if isinstance(strategy, ReplayFSDPStrategy):
            shard_frozen_base(self.model, strategy.data_parallel_mesh)

    def setup(self, stage: str) -> None:
        if self.grader is None:
            self.grader = Grader(self.cfg.reward.timeout_s, self.cfg.reward.workers)
            spec = {"correctness": self.cfg.reward.correctness, "format": self.cfg.reward.format}
            self.reward = build_reward({k: w for k, w in spec.items() if w}, self.grader)

    def on_fit_start(self) -> None:
        """With ``thought.init_move``, scale a fresh PTE adapter's global tokens on held-out prompts and their worked
        solutions (pte/engine/calibrate.py); not on a resume (its checkpoint is restored by now) or a warm start. Every
        process takes rank 0's tokens."""
        move = self.cfg.thought.init_move
        if self.cfg.method != "pte" or move is None or self.cfg.model.adapter or self.trainer.ckpt_path:
            return
        dm = self.trainer.datamodule
        examples = dm.val_examples[:CALIBRATION_TEXTS]
        prompts, solutions = [dm.prompt(e.question) for e in examples], [e.solution or "" for e in examples]
        factors, evicted = calibrate_thought(self.model, self.tokenizer, self.cfg, prompts, solutions)
        for layer in get_thought(self.model).layers:
            broadcast_(layer.global_tokens)
        if self.logger is not None:
            self.logger.log_metrics({f"thought/init_scale_layer{i}": f for i, f in enumerate(factors)}, step=0)
        scales = ", ".join(f"{f:.3g}" for f in factors)
        log.info(
            "thought.init_move=%s: global tokens scaled by %s (per layer; %d-token evictions)", move, scales, evicted
        )

    def teardown(self, stage: str) -> None:
        if self.grader is not None:
            self.grader.close()
            self.grader = None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def training_step(self, batch: dict, batch_idx: int) -> None:
        if self.cfg.objective == "sft":
            return self._sft_step(batch)
        cfg, n = self.cfg, self.cfg.rollout.group_size
        self.model.eval()  # no dropout anywhere: replay must reproduce the rollout exactly
        prompts = [p for p in batch["prompts"] for _ in range(n)]
        golds = [a for a in batch["answers"] for _ in range(n)]

        if self.generator is None:
            self.generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed + self.global_rank)
            if self._resumed_rng is not None:
                self.generator.set_state(self._resumed_rng)
        self.memory.start("rollout")
        t0 = time.perf_counter()
        draw = self._schedule_draw()
        rollouts = generate_rollouts(self.model, self.tokenizer, prompts, cfg, self.policy_name, self.generator, draw)
        t_rollout = time.perf_counter() - t0
        texts = [t for ro in rollouts for t in decode_responses(self.tokenizer, ro)]
        rewards, parts = self.reward(texts, golds)
        exp = build_experience(self.model, rollouts, rewards.to(self.device), cfg)
        self.memory.stop("rollout")

        opt = self.optimizers()
        t1 = time.perf_counter()
        self.step_skipped = False
        for k in range(cfg.grpo.updates_per_batch):
            opt.zero_grad()
            self.memory.start("replay")
            stats = policy_update(self.model, exp, cfg, self.manual_backward)
            if k == 0:  # the weights that sampled the rollouts: the gap is the replay's numerics, not policy drift
                gap = {key: stats[key] for key in ("logp_gap_sum", "logp_gap_max")}
            reduce_gradients(self.trainable_parameters())  # one all-reduce per step; a no-op in one process
            self.memory.stop("replay")
            grad_norm = self._optimizer_step(opt, stats["loss"], first=k == 0)
            if self.step_skipped:
                break
        self._finish_step()
        stats |= gap
        rewards, parts, stats = global_step_totals(rewards, parts, stats, maxima=frozenset({"logp_gap_max"}))
        self._log_step(rollouts, rewards, parts, stats, grad_norm, t_rollout, time.perf_counter() - t1)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """After the callbacks logged and checkpointed the step: act on a signal held during the optimiser step, and
        stop (the failure checkpoint follows) after ``trainer.max_nonfinite`` skipped steps in a row."""
        self._commit.close()
        limit = self.cfg.trainer.max_nonfinite
        if limit and self._nonfinite_streak >= limit:
            raise NonFiniteError(
                f"{self._nonfinite_streak} consecutive steps had a non-finite loss or gradient "
                f"(trainer.max_nonfinite={limit}); stopping. Lower optim.lr or check the data and rewards."
            )

    def _optimizer_step(self, opt, loss: float, first: bool) -> torch.Tensor:
        """Clip and apply the accumulated gradients, or skip the step when the loss or gradient is non-finite.

        From the first optimiser step of a batch on, a signal waits until the step is logged and saved.
        """
        self.memory.start("optimizer")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.cfg.optim.grad_clip)
        if not self._all_finite(loss, grad_norm):
            self._skip_nonfinite(opt)
            return grad_norm
        if first:
            self._commit.enter_context(deferred_interrupts())
        opt.step()
        self.memory.stop("optimizer")
        return grad_norm

    def _finish_step(self) -> None:
        """Advance the schedule and reset the non-finite streak, unless the step was skipped."""
        if not self.step_skipped:
            self._nonfinite_streak = 0
            self.lr_schedulers().step()

    def _all_finite(self, loss: float, grad_norm: torch.Tensor) -> bool:
        """Loss and gradient norm finite on every process (one decision everywhere, so DDP ranks stay in step)."""
        check = torch.tensor([loss, float(grad_norm)], dtype=torch.float64, device=self.device)
        return bool(torch.isfinite(all_sum(check)).all())

    def _skip_nonfinite(self, opt) -> None:
        """Drop this step's gradients without an optimiser step, and count it."""
        opt.zero_grad()
        self.memory.stop("optimizer")
        self.nonfinite_steps += 1
        self.step_skipped = True
        self._nonfinite_streak += 1
        log.warning(
            "step %d: non-finite loss or gradient, optimiser step skipped (%d so far, %d in a row)",
            self.global_step + 1,
            self.nonfinite_steps,
            self._nonfinite_streak,
        )

    def _sft_step(self, batch: dict) -> None:
        """One cache-aware SFT step on ``rollout.batch_size`` worked solutions (pte/training/sft.py)."""
        if not all(batch["solutions"]):
            raise ValueError("objective=sft needs worked solutions: use a source that has them (data.source=carry)")
        self.model.eval()
        mb, prompts, targets = self.cfg.rollout.micro_batch, batch["prompts"], batch["solutions"]
        t0 = time.perf_counter()
        draw = self._schedule_draw()
        rollouts = [
            teacher_forced(
                self.tokenizer, prompts[i : i + mb], targets[i : i + mb], self.cfg, self.policy_name, self.device, draw
            )
            for i in range(0, len(prompts), mb)
        ]
        opt = self.optimizers()
        opt.zero_grad()
        self.memory.start("replay")
        stats = sft_update(self.model, rollouts, self.manual_backward, replay_limits(self.cfg))
        self.memory.stop("replay")
        reduce_gradients(self.trainable_parameters())
        self.step_skipped = False
        grad_norm = self._optimizer_step(opt, stats["loss"], first=True)
        self._finish_step()
        logs = {
            "loss": stats["loss"],
            "entropy": stats["entropy"] / max(stats["tokens"], 1.0),
            "response_length": stats["tokens"] / len(prompts),
            "evictions_per_seq": sum(len(ro.evict_before) for ro in rollouts) / len(rollouts),
            "window": sum(ro.policy.window for ro in rollouts) / len(rollouts),
            "grad_norm": float(grad_norm),
            "lr": opt.param_groups[0]["lr"],
            "time_update_s": time.perf_counter() - t0,
        }
        self._publish(logs)

    def _schedule_draw(self) -> np.random.Generator | None:
        """The stream this step's cache schedules are drawn from (``cache.train_*``): seeded by the run's seed and the
        step alone, so every process draws the same schedules and a resumed run the ones it would have drawn."""
        return np.random.default_rng([self.cfg.seed, 29, self.global_step]) if self.cfg.cache.drawn else None

    def _log_step(self, rollouts, rewards, parts, stats, grad_norm, t_rollout, t_update) -> None:
        tokens = sum(float(ro.response_mask.sum()) for ro in rollouts)
        ro_stats = [ro.stats() for ro in rollouts]
        rows = sum(ro.response_ids.shape[0] for ro in rollouts)  # rollout KV bytes are summed over a micro-batch

        def mean(key: str) -> float:
            return sum(s[key] for s in ro_stats) / len(ro_stats)

        logs = {
            "reward_mean": rewards.mean(),
            "reward_std": rewards.std(),
            "uniform_groups": float(uniform_groups(rewards, self.cfg.rollout.group_size)),
            "replayed_frac": stats["replayed_rows"] / max(stats["rows"], 1.0),
            "response_length": mean("response_length"),
            "truncated_frac": mean("truncated_frac"),
            "evictions_per_seq": mean("evictions"),
            "window": sum(ro.policy.window for ro in rollouts) / len(rollouts),
            "kv_bytes_held_per_seq": sum(s["kv_bytes_held"] for s in ro_stats) / rows,
            "kv_bytes_peak_per_seq": max(
                s["kv_bytes_peak"] / ro.response_ids.shape[0] for s, ro in zip(ro_stats, rollouts)
            ),
            "attn_tflops": sum(s["attn_tflops"] for s in ro_stats),
            "loss": stats["loss"],
            "grad_norm": float(grad_norm),
            "lr": self.optimizers().param_groups[0]["lr"],
            "time_rollout_s": t_rollout,
            "time_update_s": t_update,
            "tokens_per_s": tokens / max(t_rollout, 1e-9),
            "nonfinite_steps": self.nonfinite_steps,
        }
        if stats["tokens"]:  # per replayed token: undefined on a step that replayed none (replay.skip_zero_loss)
            n = stats["tokens"]
            logs["kl"], logs["clip_frac"] = stats["kl"] / n, stats["clipped"] / n
            logs["entropy"], logs["logp_gap_mean"] = stats["entropy"] / n, stats["logp_gap_sum"] / n
            logs["logp_gap_max"] = stats["logp_gap_max"]
        logs.update({f"reward_{k}": v.mean() for k, v in parts.items()})
        logs["accuracy"] = parts["correctness"].mean() if "correctness" in parts else rewards.new_tensor(0.0)
        self._publish(logs)

    def _publish(self, logs: dict) -> None:
        """Average the step's scalars over processes (one all-reduce; a no-op in one process) and keep them as
        ``step_metrics`` for pte.training.progress.StepLog, which writes them at the step this batch produced (the axis
        of val/ and memory/). self.log only feeds the progress bar: sending every scalar through it took 15-20 ms of a
        0.3 s toy step in a profile."""
        keys = sorted(logs)
        values = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64, device=self.device)
        values = all_mean(values)
        self.step_metrics = {f"train/{k}": float(v) for k, v in zip(keys, values.tolist())}
        if "train/reward_mean" in self.step_metrics:
            self.log("train/reward", self.step_metrics["train/reward_mean"], prog_bar=True, logger=False)

    def configure_optimizers(self):
        o = self.cfg.optim
        opt = torch.optim.AdamW(param_groups(self.model, o.lr, o.zero_factor_lr), lr=o.lr, weight_decay=o.weight_decay)
        total = self.cfg.trainer.max_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, o.warmup_steps, total, o.schedule))
        return {"optimizer": opt, "lr_scheduler": sched}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only trainable tensors (the frozen base is rebuilt from the config) plus the sampler's state."""
        keep = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["pte_config"] = asdict(self.cfg)
        checkpoint["pte_nonfinite_steps"] = self.nonfinite_steps
        state = self.sampler_state()
        if state is not None:
            checkpoint["pte_sampler_rng"] = gather_object(state)  # one state per process

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resume sampling where it stopped, so a resumed run draws the samples an uninterrupted one would."""
        self._resumed_rng = own_share(checkpoint.get("pte_sampler_rng"))
        self.nonfinite_steps = int(checkpoint.get("pte_nonfinite_steps", 0))

    def sampler_state(self) -> torch.Tensor | None:
        """This process's sampling generator state (None before the first draw of a fresh run: seeded from ``seed``)."""
        return self.generator.get_state() if self.generator is not None else self._resumed_rng

    def restore_sampler(self, state: torch.Tensor | None) -> None:
        """Put the sampler back to ``state`` (from ``sampler_state``), e.g. to repeat an interrupted batch."""
        if self.generator is not None and state is not None:
            self.generator.set_state(state)
        else:
            self.generator, self._resumed_rng = None, state
