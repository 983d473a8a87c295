"""The sizes a memory plan depends on, resolved once from a Config (per rank, per phase).

Notation: P assumed prompt length (the padded longest prompt of a micro-batch), W thought window, e tokens evicted
at once, T ``rollout.max_new_tokens``, L layers, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

from pte.config import METHOD_POLICY, Config, ConfigError
from pte.engine.cache import CachePolicy
from pte.engine.update import bucket_capacity, replay_limits
from pte.evaluation.evaluate import Setting, default_policies, rollout_rows
from pte.plan.arch import MODULE_SHAPES, Arch

BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# DAPO-Math-17K questions under the R1/chat template: a few hundred tokens, padded to a micro-batch's longest.
DEFAULT_PROMPT_LEN = 512


@dataclass(frozen=True)
class Setup:
    """A config reduced to sizes. Byte counts per element: ``w`` base weights, ``a`` activations and K/V.

    ``policy`` is the training cache policy with W resolved for a ``prompt_len``-token prompt; ``eval_caps`` are the
    K/V slots per row of every evaluation setting eval.py would sweep.
    """

    arch: Arch
    method: str
    policy: CachePolicy
    world: int
    fsdp: bool
    w: int
    a: int
    prompt_len: int
    max_new: int
    seqs: int  # sequences this rank samples per step
    rollout_rows: int  # rows decoded at once (rollout.decode_batch)
    rollout_prompts: int  # distinct prompts among them: one prompt forward per GRPO group
    replay_rows: int
    max_chunk_tokens: int
    logits_chunk: int
    checkpointing: bool
    beta: float
    compiled_buckets: int  # rollout.compile: decode graphs, one per prompt bucket (0 = eager decoding)
    rollout_slots: int  # K/V slots per row of a rollout's cache (a prompt bucket's under rollout.compile)
    targets: tuple[str, ...]
    rank: int
    global_tokens: int
    eval_rows: int
    eval_prompts: int
    eval_caps: tuple[int, ...]
    state_grad: str = "detach"
    device: str = "cuda"

    @property
    def cap(self) -> int:
        """K/V slots per row of a replay: P + W, or P + T under the full cache."""
        return self.policy.capacity(self.prompt_len, self.max_new)

    def adapter_params(self) -> int:
        """Trainable parameters: LoRA A, B per target; PTE's h_g, W^a_Q/K/V per layer plus A, B per target."""
        a = self.arch
        shapes = [MODULE_SHAPES[t](a) for t in self.targets]
        if self.method == "pte":
            per_layer = self.global_tokens * a.hidden + self.rank * (a.q_dim + 2 * a.kv_dim)
            per_layer += sum(d_out * self.global_tokens + self.rank * d_in for d_in, d_out in shapes)
        else:
            per_layer = sum(self.rank * (d_in + d_out) for d_in, d_out in shapes)
        return a.layers * per_layer


def dtype_bytes(cfg: Config) -> tuple[int, int]:
    """(base weight bytes, activation bytes) under the precision rule (pte/training/precision.py):
    ``bf16-true``/``16-true`` cast the base to 16 bits, ``bf16-mixed`` keeps float32 weights and computes in bf16,
    else ``model.dtype``."""
    p = cfg.trainer.precision
    if p in ("bf16-true", "16-true"):
        return 2, 2
    if p in ("bf16-mixed", "16-mixed"):
        return 4, 2
    w = BYTES[cfg.model.dtype]
    return w, w


def resolve(
    cfg: Config, arch: Arch, world: int | None = None, prompt_len: int = DEFAULT_PROMPT_LEN, device: str = "cuda"
) -> Setup:
    """The sizes of ``cfg`` on ``world`` ranks (default ``trainer.devices x trainer.num_nodes``).

    ``device`` ``cpu`` adds what only the CPU kernels allocate (for validating the plan on a CPU, docs/scale.md).
    """
    world = world or cfg.trainer.world_size or 1
    r, e = cfg.rollout, cfg.eval
    if cfg.method == "base":
        raise ConfigError("method: base trains nothing; plan a training method (pte, lora_c or lora)")
    if r.batch_size % world:
        raise ConfigError(f"rollout.batch_size={r.batch_size} does not split over {world} ranks")
    policy = cfg.cache.policy_for(prompt_len, METHOD_POLICY[cfg.method])
    new = r.max_new_tokens
    eval_rows = min(rollout_rows(e) or e.batch_size * e.n_samples, e.batch_size * e.n_samples)
    decode_rows = r.decode_batch or r.batch_size // world
    adapter = cfg.thought if cfg.method == "pte" else cfg.lora
    w, a = dtype_bytes(cfg)
    return Setup(
        arch=arch,
        method=cfg.method,
        policy=policy,
        world=world,
        fsdp=cfg.trainer.strategy == "fsdp",
        w=w,
        a=a,
        prompt_len=prompt_len,
        max_new=new,
        seqs=r.batch_size // world,
        rollout_rows=decode_rows,
        rollout_prompts=max(1, decode_rows // r.group_size),
        replay_rows=replay_limits(cfg).micro_batch,
        max_chunk_tokens=cfg.replay.max_chunk_tokens,
        logits_chunk=cfg.replay.logits_chunk,
        checkpointing=cfg.replay.checkpointing,
        beta=cfg.grpo.beta,
        compiled_buckets=len(r.prompt_buckets) if r.compile else 0,
        rollout_slots=bucket_capacity(cfg, policy, prompt_len) if r.compile else policy.capacity(prompt_len, new),
        targets=tuple(adapter.target_modules),
        rank=adapter.rank,
        global_tokens=cfg.thought.global_tokens,
        eval_rows=eval_rows,
        eval_prompts=max(1, eval_rows // e.n_samples),
        eval_caps=eval_caps(cfg, prompt_len),
        state_grad=cfg.thought.state_grad,
        device=device,
    )


def eval_caps(cfg: Config, prompt_len: int) -> tuple[int, ...]:
    """K/V slots per row of each setting eval.py sweeps (policies x windows, as ``evaluate.sweep`` expands them)."""
    e = cfg.eval
    caps = set()
    for name in list(e.policies) or default_policies(cfg):
        for window in list(e.windows) or [cfg.cache.window]:
            cache = Setting(name, 0 if name == "full" else window).cache(cfg.cache)
            caps.add(cache.policy_for(prompt_len, name).capacity(prompt_len, e.max_new_tokens))
    return tuple(sorted(caps))
