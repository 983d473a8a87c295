"""``step-time``: one GRPO step of the real training code, split into rollout, reward, replay/backward, optimiser.

Runs ``generate_rollouts``, the reward, ``build_experience`` + ``policy_update`` and the AdamW step exactly as
``GRPOModule.training_step`` does (same config schema, ``key=value`` overrides), on short arithmetic prompts,
and reports per-phase medians over the steps after a warm-up step. The replay is timed twice on the same rollouts:
over every row (``replay_backward``, the phase's cost) and with ``replay.skip_zero_loss`` (``replay_skip``: only rows
whose loss can be non-zero, ``replayed_frac`` of them), so the skip's saving is measured in the same run. The rollout
is also decoded twice from the same sampler state: in inference mode (``rollout``, the engine's) and under plain
``no_grad`` (``rollout_no_grad``, the baseline), in alternating order; ``same_tokens`` checks they sample alike.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import replace
from unittest import mock

import torch

from pte.bench import common
from pte.config import METHOD_POLICY, load_config
from pte.engine import update
from pte.engine.generate import decode_responses
from pte.engine.rollout import rollout
from pte.engine.update import build_experience, generate_rollouts, policy_update
from pte.training.methods import build_model
from pte.training.prompts import config_prompt
from pte.training.rewards import Grader, build_reward

PHASES = ("rollout", "reward", "replay_backward", "optimizer")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="model.name (smollm2, tiny-llama, tiny-qwen2, a hub id)")
    p.add_argument("--methods", nargs="+", default=["pte", "lora_c"], help="methods to time (pte, lora, lora_c)")
    p.add_argument("--steps", type=int, default=3, help="steps per method; the first is a warm-up")
    p.add_argument(
        "overrides",
        nargs="*",
        default=["rollout.batch_size=8", "rollout.group_size=4", "rollout.max_new_tokens=128", "cache.window=64"],
        help="config key=value overrides",
    )


def _prompts(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n)]
    return [f"What is {a} + {b}?" for a, b in pairs], [str(a + b) for a, b in pairs]


def _update(model, rollouts, rewards, cfg, skip: bool) -> dict:
    cfg = replace(cfg, replay=replace(cfg.replay, skip_zero_loss=skip))
    exp = build_experience(model, rollouts, rewards.to(common.device()), cfg)
    return policy_update(model, exp, cfg, lambda loss: loss.backward())


def _rollouts_no_grad(*args) -> list:
    """``generate_rollouts`` with every rollout decoded under ``no_grad`` instead of inference mode."""
    with mock.patch.object(update, "rollout", torch.no_grad()(rollout.__wrapped__)):
        return generate_rollouts(*args)


def _both_rollouts(model, tok, prompts, cfg, policy: str, gen: torch.Generator, no_grad_first: bool) -> tuple:
    """(seconds in inference mode, seconds under no_grad, the rollouts, same tokens?) from the same sampler state."""
    start = gen.get_state()
    args = (model, tok, prompts, cfg, policy, gen)
    order = [(_rollouts_no_grad, "no_grad"), (generate_rollouts, "inference")]
    out = {}
    for fn, name in order if no_grad_first else order[::-1]:
        gen.set_state(start)
        out[name] = common.timed(fn, *args)
    (t_inf, ros), (t_plain, plain) = out["inference"], out["no_grad"]
    same = all(torch.equal(a.response_ids, b.response_ids) for a, b in zip(ros, plain, strict=True))
    return t_inf, t_plain, ros, float(same)


def _optimizer_step(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, clip: float) -> None:
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()


def time_method(method: str, args: argparse.Namespace) -> dict:
    cfg = load_config(None, [f"model.name={args.model}", f"method={method}", *args.overrides])
    model, tok = build_model(cfg)
    model.to(common.device())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr)
    grader = Grader(cfg.reward.timeout_s, cfg.reward.workers)
    reward = build_reward({"correctness": 1.0}, grader)
    gen = torch.Generator(common.device()).manual_seed(cfg.seed)
    per_step: list[dict[str, float]] = []
    try:
        for step in range(args.steps):
            questions, golds = _prompts(cfg.rollout.batch_size // cfg.rollout.group_size, step)
            prompts = [config_prompt(tok, cfg.data, q) for q in questions for _ in range(cfg.rollout.group_size)]
            golds = [g for g in golds for _ in range(cfg.rollout.group_size)]
            t = {}
            t["rollout"], t["rollout_no_grad"], rollouts, t["same_tokens"] = _both_rollouts(
                model, tok, prompts, cfg, METHOD_POLICY[method], gen, no_grad_first=step % 2 == 0
            )
            texts = [x for ro in rollouts for x in decode_responses(tok, ro)]
            t["reward"], (rewards, _) = common.timed(reward, texts, golds)
            opt.zero_grad()
            t["replay_skip"], stats = common.timed(_update, model, rollouts, rewards, cfg, True)
            t["replayed_frac"] = stats["replayed_rows"] / stats["rows"]
            opt.zero_grad()
            t["replay_backward"], _ = common.timed(_update, model, rollouts, rewards, cfg, False)
            t["optimizer"], _ = common.timed(_optimizer_step, params, opt, cfg.optim.grad_clip)
            t["tokens"] = float(sum(ro.response_mask.sum() for ro in rollouts))
            per_step.append(t)
    finally:
        grader.close()
    timed = per_step[1:] or per_step
    row = {"method": method, "model": args.model, "steps": len(timed)}
    extra = ("tokens", "replay_skip", "replayed_frac", "rollout_no_grad")
    row |= {k: common.median([s[k] for s in timed]) for k in (*PHASES, *extra)}
    row["total"] = sum(row[k] for k in PHASES)
    row["same_tokens"] = min(s["same_tokens"] for s in per_step)
    return row


def run(args: argparse.Namespace) -> dict:
    rows = [time_method(m, args) for m in args.methods]
    extra = ["replay_skip", "replayed_frac", "rollout_no_grad", "same_tokens"]
    print(common.table(rows, ["method", "tokens", *PHASES, "total", *extra]))
    return {"benchmark": "step-time", "overrides": args.overrides, "rows": rows}
